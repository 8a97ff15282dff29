"""Benchmark and check code shared by the CLIs in tools/ (the CLIs parse flags; the work lives here)."""
