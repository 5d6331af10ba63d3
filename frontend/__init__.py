"""Browser pages: the marketplace, provider and buyer dashboards."""
