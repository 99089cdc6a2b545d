"""Benchmarks: each measures the platform and its baseline side by side in one run, prints a table and
ends with one line of JSON. `python -m bench.<name>` runs one, `--quick` a short run CI can afford."""
