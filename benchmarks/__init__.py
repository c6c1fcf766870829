"""The benchmarks: throughput, dispatch lag, API rate, scale and cost, each measured against its target.

One command each (`python -m benchmarks.throughput`, `.lag`, `.api`, `.scale`, `.cost`); each prints
a table and writes JSON under `benchmarks/results/` (git-ignored). See BENCHMARKS.md.
"""
