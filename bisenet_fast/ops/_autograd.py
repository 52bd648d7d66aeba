"""An autograd formula shared by the fused ops' backward kernels."""
from __future__ import annotations

import torch


def refuse_double_backward(backward_op: str, op: str) -> None:
    """Give the fused backward op `backward_op` an autograd formula that raises.

    Its kernel has no derivative of its own. Without a formula, PyTorch's fallback lets a
    double backward through it (create_graph=True, then a second grad) silently return zeros
    or None; with this one it raises, naming `op`.
    """

    def backward(ctx, *grads):
        raise RuntimeError(
            f"{op} has no second derivative: its fused backward kernel is not differentiable; run the eager "
            "reference for a double backward (bisenet_fast.backends.use('eager'))"
        )

    torch.library.register_autograd(backward_op, backward)
