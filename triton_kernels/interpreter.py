"""What Triton's CPU interpreter (TRITON_INTERPRET=1) computes differently from a GPU."""
import os

import torch


def needs_fp32_dot(dtype: torch.dtype) -> bool:
    """The interpreter multiplies bfloat16 tl.dot operands as raw bits (numpy has no
    bfloat16), so interpreted bfloat16 kernels upcast them; compiled kernels never do."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"
