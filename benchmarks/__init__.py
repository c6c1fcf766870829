"""Benchmarks of issue 6: throughput, dispatch lag, API rate, scale and cost.

One command each (`python -m benchmarks.throughput`, `.lag`, `.api`, `.scale`, `.cost`); each prints
a table and writes JSON under `benchmarks/results/` (git-ignored). See BENCHMARKS.md.
"""
