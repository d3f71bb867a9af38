"""Benchmarks: `python -m lowbit.bench <name> [options]` (see `lowbit/bench/__main__.py`)."""
