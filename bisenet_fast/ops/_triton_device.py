"""The device a Triton op launches its kernels on."""
from __future__ import annotations

import functools
import itertools

import torch


def on_tensors_device(op_body):
    """Decorator of a Triton custom op's body: run it with its tensors' CUDA device current.

    Triton launches on the current CUDA device and its current stream, not on the device of
    the tensors it is given: with cuda:0 current, tensors on cuda:1 fail ("cannot be accessed
    from Triton") or fault. The C++ CUDA ops make their tensors' device current likewise
    (c10::cuda::CUDAGuard). The ops' argument checks have already required one device.
    """

    @functools.wraps(op_body)
    def on_device(*args, **kwargs):
        device = next(v.device for v in itertools.chain(args, kwargs.values()) if isinstance(v, torch.Tensor))
        if device.type != "cuda":  # CPU tensors, under TRITON_INTERPRET=1
            return op_body(*args, **kwargs)
        with torch.cuda.device(device):
            return op_body(*args, **kwargs)

    return on_device
