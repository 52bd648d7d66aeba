"""Argument checks shared by every backend of every op: a bad call fails the same clear
way whichever implementation would have run it."""
from __future__ import annotations

import functools
import inspect
from typing import Iterable, Mapping

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(
    name: str,
    value,
    *,
    dim: int | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dim is not None and value.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(value.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({names}), got {str(value.dtype).replace('torch.', '')}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be on {device} like the other inputs, got {value.device}")


def check_shape(name: str, value, shape: tuple, *, dtype: torch.dtype, device: torch.device,
                what: str | None = None) -> None:
    """value: a tensor of `shape`, dtype and device (a weight; with `what`, e.g. a gradient
    "of the output", the messages say whose shape it must have)."""
    check_tensor(name, value, dtypes=(dtype,), device=device)
    if tuple(value.shape) != tuple(shape):
        whose = f"the shape of {what}" if what else "shape"
        raise ValueError(f"{name} must have {whose} {tuple(shape)}, got {tuple(value.shape)}")


def plain_tensors_match(like: torch.Tensor, expected: Iterable[tuple[object, tuple]]) -> bool:
    """Whether each (value, shape) of `expected` is a plain torch.Tensor of that shape with
    like's dtype and device: the fast path of argument checks that run on every call of an
    op, ~0.3 us a tensor where the checks that name what is wrong take ~1.3. False only sends
    the call through those (so do tensor subclasses, e.g. Parameter or FakeTensor)."""
    tensor, dtype, device = torch.Tensor, like.dtype, like.device
    for value, shape in expected:
        if type(value) is not tensor or value.shape != shape or value.dtype != dtype or value.device != device:
            return False
    return True


def check_non_empty(name: str, value: torch.Tensor) -> None:
    if value.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(value.shape)}")


def check_inference_only(op: str, tensors: Mapping[str, torch.Tensor], for_training: str) -> None:
    """Ops without a backward refuse inputs that would need one, naming the input and what to
    train with."""
    if not torch.is_grad_enabled():
        return
    for name, value in tensors.items():
        if value.requires_grad:
            raise RuntimeError(
                f"{op} is inference-only (no backward), but {name} requires grad: run it under torch.no_grad() or "
                f"torch.inference_mode(), or {for_training}"
            )


def check_image_fits_int32(op: str, name: str, value: torch.Tensor, instead: str) -> None:
    """For kernels that address within one image (value[n]) with 32-bit offsets, which cost
    fewer registers than 64-bit ones: a clear error, naming what to use `instead`, for an
    image of 2**31 or more values (checked before anything is allocated or copied)."""
    per_image = value[0].numel() if value.dim() and value.shape[0] else 0
    if per_image >= 2**31:
        raise ValueError(
            f"{op}: {name} holds {per_image} values per image (shape {tuple(value.shape)}); its kernel's offsets "
            f"within an image are 32-bit and need fewer than 2**31; {instead}"
        )


# CUDA's bound on a launch grid's y and z extents (x may reach 2**31 - 1).
MAX_GRID_YZ = 65535


def check_grid_extent(op: str, extent: int, what: str, instead: str) -> None:
    """A clear error, before anything is launched, for a Triton grid axis that would take more
    than CUDA's y/z bound: `what` says which sizes the axis counts, `instead` what to use."""
    if extent > MAX_GRID_YZ:
        raise ValueError(f"{op}: {what} would need {extent} programs along one launch axis, which CUDA bounds "
                         f"by {MAX_GRID_YZ}; {instead}")


def fake_on_one_device(op: str):
    """Decorator of a fake kernel. A call mixing devices, e.g. CPU tensors and a meta one, is
    dispatched to the fake kernel (the Meta key wins), past the real kernels' device checks,
    and would return uninitialised tensors on the first argument's device: it fails instead,
    naming the arguments. Checked only where fake kernels run (tracing, meta tensors)."""

    def decorate(fake):
        signature = inspect.signature(fake)

        @functools.wraps(fake)
        def checked(*args, **kwargs):
            first = None
            for name, value in signature.bind(*args, **kwargs).arguments.items():
                values = value if isinstance(value, tuple) else (value,)  # *args
                for i, tensor in enumerate(values):
                    if not isinstance(tensor, torch.Tensor):
                        continue
                    label = f"{name}[{i}]" if isinstance(value, tuple) else name
                    if first is None:
                        first = (label, tensor.device)
                    elif tensor.device != first[1]:
                        raise ValueError(f"{op}: {label} is on {tensor.device} but {first[0]} on {first[1]}; "
                                         "all tensor arguments must be on one device")
            return fake(*args, **kwargs)

        return checked

    return decorate


def fake_inference_only(op: str, for_training: str):
    """Decorator of the fake kernel of a C++ op without a backward. A direct torch.ops call
    under torch.compile is traced through the fake kernel, and the compiled graph then runs
    the real kernel with grad mode off, past its refusal of inputs that require grad
    (csrc/common/inference_only.h): their gradients would silently never arrive. The fake
    kernel refuses them instead, as check_inference_only (`for_training` as there)."""

    def decorate(fake):
        signature = inspect.signature(fake)

        @functools.wraps(fake)
        def checked(*args, **kwargs):
            arguments = signature.bind(*args, **kwargs).arguments
            check_inference_only(op, {name: value for name, value in arguments.items()
                                      if isinstance(value, torch.Tensor)}, for_training)
            return fake(*args, **kwargs)

        return checked

    return decorate
