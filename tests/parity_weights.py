"""Deterministic BiSeNetV2 weights and inputs for the mmseg parity fixture.

Both scripts/make_mmseg_parity_fixture.py (run where mmsegmentation is installed) and
tests/test_mmseg_parity.py (no mmseg) call these functions, so mmseg and bisenet_fast
are loaded with the same tensors. Everything comes from one torch.Generator, drawn in
state_dict key order; nothing depends on module types, only on each key's name and shape.

Scales are chosen so activations stay O(1) through the ~40 conv+BN layers and the GE
residuals (He-normal weights let them grow to ~300 by stage4; LeCun-normal keeps them
under ~5), BN running statistics near those of such activations, gammas near 1.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

WEIGHT_SEED = 20211
INPUT_SEED = 7
NUM_CLASSES = 19
IGNORE_INDEX = 255
IGNORED_FRACTION = 0.1
# conv_seg weights are this much larger, so that some pixels are predicted with probability
# over OHEM's 0.7 (at gain 1 the logits stay under ~3 and every pixel would be kept).
LOGIT_GAIN = 8.0


def _role(key: str, shape: Sequence[int], shapes: dict[str, Sequence[int]]) -> str:
    """What kind of tensor `key` is, judged from its name and its sibling's shape."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf in ("running_mean", "running_var", "num_batches_tracked"):
        return leaf
    if leaf == "weight":
        return "conv_weight" if len(shape) == 4 else "bn_weight"
    if leaf == "bias":
        sibling = shapes.get(key[: -len("bias")] + "weight")
        if sibling is None:
            raise ValueError(f"{key}: a bias without a weight beside it")
        return "conv_bias" if len(sibling) == 4 else "bn_bias"
    raise ValueError(f"{key}: unknown state_dict entry (expected conv/BN parameters or BN buffers)")


def make_state_dict(reference_keys_and_shapes: Iterable[Sequence]) -> dict[str, torch.Tensor]:
    """A full state_dict for the given [(key, shape[, dtype]), ...], drawn in that order.

    Conv weights ~ N(0, 1/fan_in) with fan_in = in_channels/groups * kh * kw (the weight's
    shape[1:]), times LOGIT_GAIN for the heads' conv_seg; conv biases ~ N(0, 0.1^2);
    BN weight ~ U(0.5, 1.5), bias ~ N(0, 0.1^2), running_mean ~ N(0, 0.1^2),
    running_var ~ U(0.5, 2); num_batches_tracked ~ U{0..999}.
    """
    entries = [(str(e[0]), tuple(int(d) for d in e[1])) for e in reference_keys_and_shapes]
    shapes = dict(entries)
    gen = torch.Generator().manual_seed(WEIGHT_SEED)
    state = {}
    for key, shape in entries:
        role = _role(key, shape, shapes)
        if role == "conv_weight":
            fan_in = shape[1] * shape[2] * shape[3]
            value = torch.randn(shape, generator=gen) * fan_in**-0.5
            if key.endswith("conv_seg.weight"):
                value = value * LOGIT_GAIN
        elif role in ("conv_bias", "bn_bias", "running_mean"):
            value = torch.randn(shape, generator=gen) * 0.1
        elif role == "bn_weight":
            value = torch.rand(shape, generator=gen) + 0.5
        elif role == "running_var":
            value = torch.rand(shape, generator=gen) * 1.5 + 0.5
        else:  # num_batches_tracked
            value = torch.randint(0, 1000, shape, generator=gen, dtype=torch.int64)
        state[key] = value
    return state


def make_inputs(shape: Sequence[int], seed: int = INPUT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """A normalized image batch ~ N(0, 1) of `shape` (N, 3, H, W) and integer labels (N, H, W)
    in [0, NUM_CLASSES) with about IGNORED_FRACTION of the pixels set to IGNORE_INDEX."""
    n, _, height, width = shape
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(tuple(shape), generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (n, height, width), generator=gen, dtype=torch.int64)
    ignored = torch.rand((n, height, width), generator=gen) < IGNORED_FRACTION
    return image, labels.masked_fill(ignored, IGNORE_INDEX)
