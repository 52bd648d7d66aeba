"""What Triton's CPU interpreter (TRITON_INTERPRET=1) computes differently from a GPU."""
import torch

from bisenet_fast import backends


def needs_fp32_dot(dtype: torch.dtype) -> bool:
    """The interpreter multiplies bfloat16 tl.dot operands as raw bits (numpy has no
    bfloat16), so interpreted bfloat16 kernels upcast them; compiled kernels never do.
    Interpreted means as Triton decided at import (backends.triton_interpreted), not the
    environment now: a TRITON_INTERPRET unset later still runs the kernels interpreted."""
    return dtype == torch.bfloat16 and backends.triton_interpreted()
