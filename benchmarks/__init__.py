"""Benchmarks for dynconv: per-sample conv strategies, layers and whole models, JAX vs PyTorch.

Run ``python -m benchmarks --help``. Results (JSON + Markdown, device and versions
named) go to ``benchmarks/results/``; ``docs/performance.md`` explains them.
"""
