"""Cross-framework parity: the PyTorch references (``dynconv_torch``) against the Flax modules
(``dynconv_jax``) built from converted weights — forward (eval and train), running statistics,
gradients and SGD trajectories, in float64 and float32. ``python -m parity --help``.

:mod:`parity.cases` holds the case registry, :mod:`parity.harness` runs a case.
"""
