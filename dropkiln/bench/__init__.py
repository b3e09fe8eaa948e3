"""Benchmarks: speed figures with ratios against a baseline run in the same process."""
