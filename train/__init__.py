"""Training loop for the dynconv models: optax + Orbax + TFDS data sources, data-parallel with
``jax.sharding``. Run ``python -m train`` (see docs/training.md); reuse the pieces:

* :mod:`train.config` - :class:`~train.config.Config` and ``--key=value`` parsing;
* :mod:`train.data` - the embedded digits / TFDS loader with deterministic batches;
* :mod:`train.steps` - model factory, optimiser, schedules, ``train_step``, ``eval_step``;
* :mod:`train.checkpoint` - Orbax checkpoints with integrity checks and fallback;
* :mod:`train.parallel` - mesh and shardings;
* :mod:`train.loop` - :func:`~train.loop.train_and_evaluate`;
* :mod:`train.export` - safetensors export and the ``dynconv_torch`` agreement check.
"""
