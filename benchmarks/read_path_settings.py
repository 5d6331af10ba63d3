"""Settings for benchmarks/read_path.py's server: the gateway's own, plus one URL for the
bare-DRF floor (benchmarks/read_path_urls.py)."""

from config.settings import *  # noqa: F403

ROOT_URLCONF = "benchmarks.read_path_urls"
