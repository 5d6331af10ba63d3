"""The market: users and API tokens, listings, orders and their lifecycle, the escrow ledger,
billing and settlement."""
