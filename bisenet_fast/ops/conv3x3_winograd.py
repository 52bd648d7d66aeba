"""Dense 3x3 convolution (stride 1, padding 1) + bias (+ ReLU) by Winograd's minimal
filtering F(m x m, 3x3), m = 2 or 4, inference only, for the CPU.

On the CPU the fused model spends most of its time in oneDNN's direct 3x3 convs, which
already run near the cores' peak FLOP rate. F(m x m, 3x3) computes an m x m output tile
from an (m+2) x (m+2) input tile with (m+2)^2 multiplies per (input, output) channel pair
instead of 9 m^2: 2.25x fewer for m = 2, 4x fewer for m = 4. The weight is transformed once,
by `winograd_weight`, into the ((m+2)^2, cin, cout) Winograd domain (its first dimension
tells the kernel which m); `conv3x3_winograd` then transforms input tiles (B^T d B), runs
one GEMM per point against it and transforms back (A^T M A), adding the bias and applying
the ReLU on the way out.

Accuracy: sums run in another order and through the transforms. Against a float64 conv,
float32 F(2x2) is within ~1e-6 of a conv's output scale, F(4x4) (larger transform
coefficients) within ~1e-5; through the whole fused network the logits stay within ~1e-6
of float64 either way (tests/test_fuse.py holds them to 1e-4). float64 agrees to ~1e-14.

Memory: each CPU thread keeps its scratch buffer (one block of tiles in the Winograd
domain, ~11 MB at the decode head's 128->1024) between calls, so repeated calls do not
page-fault fresh buffers in.

Non-finite inputs: a NaN or infinity makes every output of the tiles that read it NaN (the
transforms mix a whole tile), where a direct conv gives NaN/inf in its 3x3 neighbourhood
only; no NaN is lost.

Backends: cpp (the C++ kernel, float32/float64 CPU tensors) and eager (the same algorithm in
plain PyTorch, below). There is no GPU kernel: on CUDA, cuDNN already picks Winograd or
implicit-GEMM algorithms for these convs, and the fused model calls F.conv2d there (see
bisenet_fast/models/fused.py). Float16/bfloat16 are not offered either: the transforms'
cancellations need float32 accumulation at every step, which the GEMMs' half-precision
outputs would not keep.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from bisenet_fast import backends
from bisenet_fast.ops._checks import (
    check_inference_only,
    check_non_empty,
    check_tensor,
    fake_inference_only,
    fake_on_one_device,
)

DTYPES = (torch.float32, torch.float64)

# (G, B^T, A^T) of F(m x m, 3x3) for output tile side m (Lavin & Gray, "Fast Algorithms for
# Convolutional Neural Networks"; m = 4 interpolates at 0, +-1, +-2 and infinity).
MATRICES = {
    2: (
        ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0)),
        ((1.0, 0.0, -1.0, 0.0), (0.0, 1.0, 1.0, 0.0), (0.0, -1.0, 1.0, 0.0), (0.0, 1.0, 0.0, -1.0)),
        ((1.0, 1.0, 1.0, 0.0), (0.0, 1.0, -1.0, -1.0)),
    ),
    4: (
        ((1 / 4, 0.0, 0.0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
         (1 / 24, -1 / 12, 1 / 6), (0.0, 0.0, 1.0)),
        ((4.0, 0.0, -5.0, 0.0, 1.0, 0.0), (0.0, -4.0, -4.0, 1.0, 1.0, 0.0), (0.0, 4.0, -4.0, -1.0, 1.0, 0.0),
         (0.0, -2.0, -1.0, 2.0, 1.0, 0.0), (0.0, 2.0, -1.0, -2.0, 1.0, 0.0), (0.0, 4.0, 0.0, -5.0, 0.0, 1.0)),
        ((1.0, 1.0, 1.0, 1.0, 1.0, 0.0), (0.0, 1.0, -1.0, 2.0, -2.0, 0.0), (0.0, 1.0, 1.0, 4.0, 4.0, 0.0),
         (0.0, 1.0, -1.0, 8.0, -8.0, 1.0)),
    ),
}
TILE_OF_POINTS = {(m + 2) ** 2: m for m in MATRICES}


def _matrix(values, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)


@torch.no_grad()
def winograd_weight(weight: torch.Tensor, tile: int = 4) -> torch.Tensor:
    """(cout, cin, 3, 3) conv weight -> ((tile+2)^2, cin, cout) Winograd-domain weight G w G^T
    of F(tile x tile, 3x3), tile 2 or 4, computed in float64 and returned in weight's dtype;
    point k = (tile+2) * row + column."""
    check_tensor("weight", weight, dim=4, dtypes=DTYPES)
    if tuple(weight.shape[2:]) != (3, 3) or weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must have shape (cout, cin, 3, 3) with cout, cin > 0, got {tuple(weight.shape)}")
    if isinstance(tile, bool) or not isinstance(tile, numbers.Integral) or tile not in MATRICES:
        raise ValueError(f"tile must be one of {tuple(MATRICES)}, got {tile!r}")
    w64 = weight.double()
    g = _matrix(MATRICES[tile][0], w64)
    packed = torch.einsum("ai,ocij,bj->abco", g, w64, g)  # (alpha, alpha, cin, cout)
    return packed.reshape((tile + 2) ** 2, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def conv3x3_winograd_reference(x, packed_weight, bias, relu=False):
    """Eager oracle of the algorithm: unfold (m+2)^2 tiles with stride m, transform, one matmul
    per point, transform back, crop. Tests also compare it with F.conv2d on the untransformed
    weight."""
    tile = TILE_OF_POINTS[packed_weight.shape[0]]
    alpha = tile + 2
    n, cin, height, width = x.shape
    tiles_h, tiles_w = -(-height // tile), -(-width // tile)
    padded = F.pad(x, (1, tile * tiles_w + 1 - width, 1, tile * tiles_h + 1 - height))
    tiles = padded.unfold(2, alpha, tile).unfold(3, alpha, tile)  # (n, cin, tiles_h, tiles_w, alpha, alpha)
    bt, at = _matrix(MATRICES[tile][1], x), _matrix(MATRICES[tile][2], x)
    v = torch.einsum("ai,nchwij,bj->abnhwc", bt, tiles, bt).reshape(alpha * alpha, -1, cin)
    m = torch.bmm(v, packed_weight).reshape(alpha, alpha, n, tiles_h, tiles_w, -1)
    y = torch.einsum("ai,ijnhwo,bj->nohawb", at, m, at).reshape(n, -1, tile * tiles_h, tile * tiles_w)
    y = y[:, :, :height, :width] + bias[None, :, None, None]
    y = F.relu(y) if relu else y
    return y.contiguous(memory_format=torch.channels_last)


def check_inputs(x, packed_weight, bias):
    check_tensor("x", x, dim=4, dtypes=DTYPES)
    check_tensor("packed_weight", packed_weight, dim=3, dtypes=(x.dtype,), device=x.device)
    check_tensor("bias", bias, dim=1, dtypes=(x.dtype,), device=x.device)
    check_non_empty("x", x)
    cin = x.shape[1]
    if packed_weight.shape[0] not in TILE_OF_POINTS or packed_weight.shape[1] != cin or packed_weight.shape[2] == 0:
        raise ValueError(
            f"packed_weight must have shape (16 or 36, {cin}, cout) (winograd_weight of a (cout, {cin}, 3, 3) "
            f"weight), got {tuple(packed_weight.shape)}"
        )
    if bias.shape[0] != packed_weight.shape[2]:
        raise ValueError(f"bias must have shape ({packed_weight.shape[2]},), got {tuple(bias.shape)}")
    check_inference_only("conv3x3_winograd", {"x": x, "packed_weight": packed_weight, "bias": bias},
                         "use F.conv2d for training")


@torch.library.register_fake("bisenet_fast::conv3x3_winograd")
@fake_on_one_device("conv3x3_winograd")
@fake_inference_only("conv3x3_winograd", "use F.conv2d for training")
def _conv3x3_winograd_fake(x, packed_weight, bias, relu):
    n, _, height, width = x.shape
    return torch.empty((n, packed_weight.shape[2], height, width), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def conv3x3_winograd(x, packed_weight, bias, *, relu=False):
    """conv2d(x, w, bias, stride=1, padding=1) (then ReLU) with packed_weight = winograd_weight(w, tile).
    Output channels_last."""
    check_inputs(x, packed_weight, bias)
    if not isinstance(relu, bool):
        raise TypeError(f"relu must be a bool, got {type(relu).__name__}")
    backend = backends.resolve("conv3x3_winograd", x.device, gpu_preference=())
    if backend == "eager":
        return conv3x3_winograd_reference(x, packed_weight, bias, relu)
    return torch.ops.bisenet_fast.conv3x3_winograd(x, packed_weight, bias, relu)
