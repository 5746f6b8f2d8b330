"""Model factory, optimiser, schedules and the pure train/eval steps.

Everything here is a small pure function in the style of Flax's examples, so that other
scripts (evaluation, ablations) can build the same model and state from a
:class:`~train.config.Config` and reuse the steps:

    model = create_model(config, num_classes, image_shape)
    tx, lr_schedule = create_optimizer(config, steps_per_epoch, total_steps)
    state = create_train_state(jax.random.key(config.seed), model, image_shape, tx)
    state, metrics = train_step(state, images, labels, dropout_key, temperature_fn=..., ...)
    state, sums = accumulating_train_step(state, sums, images, labels, dropout_key, ...)  # what the loop runs
    sums = eval_step(state, images, labels, mask, temperature)
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from dynconv_jax import models
from dynconv_spec import KW_CONV
from train.config import UsageError

Array = jax.Array


class TrainState(train_state.TrainState):
    """Flax's TrainState plus BatchNorm statistics (``{}`` for models without BatchNorm)."""

    batch_stats: Any = None


def model_kwargs(config, num_classes: int, image_shape) -> Dict[str, Any]:
    """Keyword arguments of ``dynconv_jax.models.<config.model>`` (and of the identical
    ``dynconv_torch.models`` constructor, minus ``dtype``); ``image_shape`` is ``(H, W, C)``."""
    image_size, in_channels = image_shape[0], image_shape[-1]
    kwargs: Dict[str, Any] = dict(
        conv=config.conv, num_experts=config.num_experts, num_classes=num_classes, in_channels=in_channels
    )
    if config.dropout is not None:
        kwargs["dropout"] = config.dropout
    options = {} if config.attention_bn_init is None else {"attention_bn_init": config.attention_bn_init}
    if config.attention_norm != "batch":
        options["attention_norm"] = config.attention_norm
    if config.conv == KW_CONV:
        options = kw_conv_options(config)
    if options:
        kwargs["conv_options"] = options
    if config.model.startswith("resnet"):
        stem = config.stem
        if stem == "auto":
            stem = "cifar" if image_size <= 64 else "imagenet"
        kwargs.update(stem=stem, base_width=config.base_width)
    else:
        kwargs.update(width_mult=config.width_mult)
    return kwargs


def kw_conv_options(config) -> Dict[str, Any]:
    """The warehouse options (``conv_options`` of ``conv='kernelwarehouse'``) of the ``--kw_*`` flags;
    ``--kw_sharing_range=layer,conv`` is ``('layer', 'conv')``, the official ``layer_conv`` passes as is."""
    options: Dict[str, Any] = dict(
        cell_num_ratio=config.kw_ratio,
        cell_inplane_ratio=config.kw_inplane_ratio,
        cell_outplane_ratio=config.kw_outplane_ratio,
        nonlocal_basis_ratio=config.kw_basis_ratio,
        assignment_bias_init=config.kw_assignment_bias_init,
    )
    if config.kw_sharing_range is not None:
        text = config.kw_sharing_range
        options["sharing_range"] = tuple(p.strip() for p in text.split(",") if p.strip()) if "," in text else text
    return options


def check_image_size(config, image_shape) -> None:
    """Raise a ValueError naming ``--image_size`` if the input is smaller than the model's total
    stride (its last feature map would be below 1x1: 8 for the CIFAR stem, 32 otherwise)."""
    stem = model_kwargs(config, 1, image_shape).get("stem", "imagenet")
    stride = 8 if stem == "cifar" else 32
    if min(image_shape[:2]) < stride:
        raise UsageError(
            f"--image_size: {image_shape[0]}x{image_shape[1]} inputs are smaller than the total stride "
            f"({stride}) of {config.model} with the {stem!r} stem; use --image_size >= {stride}"
        )


def create_model(config, num_classes: int, image_shape):
    """The ``dynconv_jax.models`` network named by ``config.model`` (bf16 compute, or float64 parameters
    and compute, if asked)."""
    kwargs = model_kwargs(config, num_classes, image_shape)
    if config.dtype == "bfloat16":
        kwargs["dtype"] = jnp.bfloat16
    elif config.dtype == "float64":
        kwargs.update(dtype=jnp.float64, param_dtype=jnp.float64)
    return models.create_model(config.model, **kwargs)


def temperature_schedule(config, steps_per_epoch: int) -> Callable[[Any], Array]:
    """Linear annealing ``temp_init -> temp_final`` over the first ``temp_epochs`` epochs, then
    constant (DY-CNN, Chen et al. CVPR 2020, and ODConv, Li et al. ICLR 2022, use 30 -> 1 over
    10 epochs). Returns a function of the (traced) step, so annealing never recompiles."""
    if config.conv == KW_CONV:
        return kw_warmup_schedule(config, steps_per_epoch)
    anneal_steps = int(round(config.temp_epochs * steps_per_epoch))
    if anneal_steps == 0:
        return optax.constant_schedule(config.temp_final)
    return optax.linear_schedule(config.temp_init, config.temp_final, anneal_steps)


def kw_warmup_schedule(config, steps_per_epoch: int) -> Callable[[Any], Array]:
    """KernelWarehouse's warm-up weight tau (passed to the model as ``temperature``): linear from
    ``kw_temp_init`` to 0 over ``kw_temp_epochs`` (default ``temp_epochs``) epochs, then 0, as the
    official ``get_temperature`` (:func:`dynconv_spec.kernelwarehouse.warmup_temperature`), which the
    official loop evaluates at the 1-based iteration: the step count plus one."""
    epochs = config.temp_epochs if config.kw_temp_epochs is None else config.kw_temp_epochs
    total = int(round(epochs * steps_per_epoch))
    if total == 0:
        return optax.constant_schedule(0.0)
    warmup = optax.linear_schedule(config.kw_temp_init, 0.0, total)
    return lambda step: warmup(step + 1)


def learning_rate_schedule(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate`` over ``warmup_epochs``, then cosine decay to 0
    at ``total_steps``, step decay (``x decay_factor`` at each of ``decay_epochs``, counted from the
    start of training) or constant."""
    warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))
    if config.schedule == "cosine":
        main = optax.cosine_decay_schedule(config.learning_rate, max(total_steps - warmup, 1))
    elif config.schedule == "step":
        boundaries = {int(round(e * steps_per_epoch)) - warmup: config.decay_factor for e in config.decay_epochs}
        main = optax.piecewise_constant_schedule(config.learning_rate, boundaries)
    else:
        main = optax.constant_schedule(config.learning_rate)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, config.learning_rate, warmup), main], [warmup])


def decay_mask(params) -> Any:
    """True for the leaves weight decay applies to: every ``kernel`` (convolution, dense and
    expert kernels); False for biases (including expert biases) and BatchNorm scales."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    return flax.traverse_util.unflatten_dict({path: path[-1] == "kernel" for path in flat})


def create_optimizer(
    config, steps_per_epoch: int, total_steps: int
) -> Tuple[optax.GradientTransformation, optax.Schedule]:
    """SGD (+momentum, Nesterov; coupled L2 decay as in PyTorch's SGD) or AdamW (decoupled
    decay), optional global-norm clipping first. Returns ``(tx, learning_rate_schedule)``."""
    schedule = learning_rate_schedule(config, steps_per_epoch, total_steps)
    parts = []
    if config.grad_clip_norm is not None:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if config.optimizer == "sgd":
        if config.weight_decay:
            parts.append(optax.add_decayed_weights(config.weight_decay, mask=decay_mask))
        parts.append(optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov))
    else:
        parts.append(
            optax.adamw(
                schedule, b1=config.momentum, b2=config.beta2, weight_decay=config.weight_decay, mask=decay_mask
            )
        )
    return optax.chain(*parts), schedule


def init_variables_fn(model, image_shape) -> Callable[[Array], Dict[str, Any]]:
    """``rng -> variables``: ``model.init`` in eval mode on a ``[1, *image_shape]`` zero input, its
    'params' and 'dropout' streams split from ``rng``. Pure: ``jax.jit`` it, or lower it ahead of time."""

    def init(rng: Array) -> Dict[str, Any]:
        params_key, dropout_key = jax.random.split(rng)
        dummy = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
        return model.init({"params": params_key, "dropout": dropout_key}, dummy, train=False)

    return init


def train_state_from_variables(variables: Dict[str, Any], model, tx) -> TrainState:
    """Step 0 of training ``variables`` (``params`` and, if any, ``batch_stats``) with ``tx``."""
    return TrainState.create(
        apply_fn=model.apply, params=variables["params"], batch_stats=variables.get("batch_stats", {}), tx=tx
    )


def create_train_state(rng: Array, model, image_shape, tx) -> TrainState:
    """Initialise parameters and BatchNorm statistics on a ``[1, *image_shape]`` input."""
    return train_state_from_variables(jax.jit(init_variables_fn(model, image_shape))(rng), model, tx)


def _variables(state: TrainState, params=None) -> Dict[str, Any]:
    variables = {"params": state.params if params is None else params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    return variables


def cross_entropy(logits: Array, labels: Array, num_classes: int, label_smoothing: float = 0.0) -> Array:
    """Per-example softmax cross-entropy ``[B]`` in float32, with optional label smoothing."""
    targets = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def loss_and_grads(
    state: TrainState, images: Array, labels: Array, dropout_key: Array, temperature, label_smoothing: float
) -> Tuple[Array, Array, Dict[str, Any], Any]:
    """The training objective at ``state``'s parameters on one batch (training mode, dropout key
    ``fold_in(dropout_key, step)``) and its gradient: ``(loss, logits, batch-stat updates, grads)``."""
    key = jax.random.fold_in(dropout_key, state.step)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            _variables(state, params),
            images,
            train=True,
            temperature=temperature,
            mutable=["batch_stats"],
            rngs={"dropout": key},
        )
        loss = cross_entropy(logits, labels, logits.shape[-1], label_smoothing).mean()
        return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return loss, logits, updates, grads


def train_step(
    state: TrainState,
    images: Array,
    labels: Array,
    dropout_key: Array,
    *,
    temperature_fn: Callable,
    label_smoothing: float,
    learning_rate_fn: Optional[Callable] = None,
    normalize: Optional[Callable] = None,
) -> Tuple[TrainState, Dict[str, Array]]:
    """One optimisation step on a (possibly sharded) global batch.

    images ``[B, H, W, C]`` float32, or raw (e.g. the input pipeline's uint8) turned into the model's
    input by ``normalize`` inside the step; labels ``[B]`` int32. BatchNorm statistics are computed
    over the whole global batch: under ``jax.jit`` with a batch sharded over devices, the
    batch mean is a cross-device reduction. Returns the new state and scalar metrics
    (``loss`` = training objective, ``accuracy``, ``grad_norm``, ``temperature``, and
    ``learning_rate`` = ``learning_rate_fn(step)`` when given).
    """
    temperature = temperature_fn(state.step)
    if normalize is not None:
        images = normalize(images)
    loss, logits, updates, grads = loss_and_grads(state, images, labels, dropout_key, temperature, label_smoothing)
    new_state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        "grad_norm": optax.tree.norm(grads),
        "temperature": jnp.asarray(temperature, jnp.float32),
    }
    if learning_rate_fn is not None:
        metrics["learning_rate"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
    return new_state, metrics


def zero_metric_sums() -> Dict[str, Array]:
    """What :func:`accumulate_metrics` starts from: nothing summed, no non-finite step seen (-1)."""
    return {
        "loss": jnp.float32(0),
        "accuracy": jnp.float32(0),
        "steps": jnp.int32(0),
        "first_nonfinite_step": jnp.int32(-1),
        "nonfinite_loss": jnp.float32(0),
        "nonfinite_grad_norm": jnp.float32(0),
        "last_loss": jnp.float32(0),
        "last_accuracy": jnp.float32(0),
        "last_grad_norm": jnp.float32(0),
        "learning_rate": jnp.float32(0),
        "temperature": jnp.float32(0),
    }


def accumulate_metrics(sums: Dict[str, Array], metrics: Dict[str, Array], step: Array) -> Dict[str, Array]:
    """Adds one step's metrics to on-device sums, so the loop fetches them only every few steps.

    Keeps the sums of ``loss`` and ``accuracy`` and the number of ``steps``; the first step (0-based
    ``step``) whose loss or gradient norm is NaN/Inf with those two values; and the latest step's
    values (``last_*``, ``learning_rate``, ``temperature``) for logging. Every entry keeps the dtype
    of ``sums`` (float32 and int32 from :func:`zero_metric_sums`), also where the metrics are float64
    (under ``jax_enable_x64``), so the step's output sums fit its compiled input.
    """
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    first_bad = (sums["first_nonfinite_step"] < 0) & ~finite
    new_sums = {
        "loss": sums["loss"] + metrics["loss"],
        "accuracy": sums["accuracy"] + metrics["accuracy"],
        "steps": sums["steps"] + 1,
        "first_nonfinite_step": jnp.where(first_bad, step.astype(jnp.int32), sums["first_nonfinite_step"]),
        "nonfinite_loss": jnp.where(first_bad, metrics["loss"], sums["nonfinite_loss"]),
        "nonfinite_grad_norm": jnp.where(first_bad, metrics["grad_norm"], sums["nonfinite_grad_norm"]),
        "last_loss": metrics["loss"],
        "last_accuracy": metrics["accuracy"],
        "last_grad_norm": metrics["grad_norm"],
        "learning_rate": metrics.get("learning_rate", sums["learning_rate"]),
        "temperature": metrics["temperature"],
    }
    return {key: value.astype(sums[key].dtype) for key, value in new_sums.items()}


def accumulating_train_step(
    state: TrainState, sums: Dict[str, Array], images: Array, labels: Array, dropout_key: Array, **train_step_kwargs
) -> Tuple[TrainState, Dict[str, Array]]:
    """:func:`train_step`, its metrics added to ``sums`` on the device (:func:`accumulate_metrics`)."""
    step = state.step
    state, metrics = train_step(state, images, labels, dropout_key, **train_step_kwargs)
    return state, accumulate_metrics(sums, metrics, step)


def eval_step(
    state: TrainState,
    images: Array,
    labels: Array,
    mask: Array,
    temperature: Optional[Array] = None,
    *,
    normalize: Optional[Callable] = None,
) -> Dict[str, Array]:
    """Sums over the real (``mask == 1``) examples of a padded batch: cross-entropy (no label
    smoothing), number correct and count. ``normalize``: as in :func:`train_step`."""
    if normalize is not None:
        images = normalize(images)
    logits = state.apply_fn(_variables(state), images, train=False, temperature=temperature)
    loss = cross_entropy(logits, labels, logits.shape[-1])
    return {
        "loss": jnp.sum(loss * mask),
        "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
        "count": jnp.sum(mask),
    }
