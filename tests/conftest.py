"""Test setup: without a GPU, Triton kernels run on the CPU through its interpreter, which
must be switched on before triton (and so bisenet_fast) is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
