"""datahall benchmarks: `python -m benchmarks [SYSTEM]` runs every benchmark (or one system's)."""
