"""bench/registry: the platform's registry endpoints against MLflow's own server, side by side.

Run `python -m bench.registry [--quick]` inside `python -m config.stack exec` (see `make bench`).
"""
