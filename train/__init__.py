"""Training loop for the dynconv models: optax + Orbax + a grain input pipeline, data-parallel with
``jax.sharding`` over one or many processes. Run ``python -m train`` (see docs/training.md); reuse the pieces:

* :mod:`train.config` - :class:`~train.config.Config` and ``--key=value`` parsing;
* :mod:`train.data` - the data set a configuration names (:func:`~train.data.load_dataset`), from
  :mod:`train.sources` (embedded digits, image folders, TFDS ArrayRecord) and :mod:`train.preprocess`;
* :mod:`train.pipeline` - the grain pipeline whose batches are a pure function of ``(seed, step)``
  (:mod:`train.worker_watchdog` stops its workers with the run);
* :mod:`train.presets` - the papers' recipes for ``--config=NAME``;
* :mod:`train.steps` - model factory, optimiser, schedules, ``train_step``, ``eval_step``;
* :mod:`train.checkpoint` - Orbax checkpoints with integrity checks and fallback;
* :mod:`train.parallel` - mesh and shardings;
* :mod:`train.loop` - :func:`~train.loop.train_and_evaluate`;
* :mod:`train.export` - safetensors export and the ``dynconv_torch`` agreement check.
"""
