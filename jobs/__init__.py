"""Cluster entry points: parse a config, call one pipeline, exit. Run with `python -m jobs.NAME`."""
