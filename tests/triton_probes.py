"""Small Triton kernels that run a kernel module's @triton.jit helper on chosen values, for
index arithmetic whose failing inputs need tensors too large for a test (e.g. positions past
2**31). Imported by the tests that use them (which skip where triton is missing)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from bisenet_fast.triton_kernels.ge_expand_train import _split_pixels


@triton.jit
def _split_pixels_probe(offs_ptr, out_ptr, count, HO, WO, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    mask = i < count
    offs = tl.load(offs_ptr + i, mask=mask, other=0)
    n, oh, ow = _split_pixels(offs, HO, WO)
    tl.store(out_ptr + 3 * i, n, mask=mask)
    tl.store(out_ptr + 3 * i + 1, oh, mask=mask)
    tl.store(out_ptr + 3 * i + 2, ow, mask=mask)


def split_pixels(offsets: list[int], height: int, width: int, device) -> list[tuple[int, int, int]]:
    """[(n, oh, ow)] of each flat NHW position in `offsets`, as the GE kernels split them."""
    offs = torch.tensor(offsets, dtype=torch.int64, device=device)
    out = torch.empty((len(offsets), 3), dtype=torch.int64, device=device)
    _split_pixels_probe[(1,)](offs, out, len(offsets), height, width, BLOCK=triton.next_power_of_2(len(offsets)))
    return [tuple(row) for row in out.tolist()]
