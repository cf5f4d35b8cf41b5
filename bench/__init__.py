"""Benchmark scripts (run with ``python -m bench.<name> --help``); not part of the installed package."""
