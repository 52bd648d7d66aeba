"""The fused GE-layer inference op (bisenet_fast.ops.ge_layer_stride1/2) against its eager
reference: every GE configuration of BiSeNetV2, odd sizes, layouts, dtypes, bad inputs,
the fake kernel under torch.compile, Triton under the interpreter."""
import re

import pytest
import torch

import bisenet_fast as bf
from bisenet_fast.ops import ge_layer as ge
from tests.helpers import (
    assert_fake_kernel_refuses_mixed_devices,
    CUDA,
    requires_cuda,
    requires_cuda_build,
    requires_triton,
    triton_device,
)

# (cin, cout, stride) of every GE layer in BiSeNetV2's semantic branch.
NETWORK_CONFIGS = [(16, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1)]
# Output-scale-relative tolerances against a float64 reference.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def make_inputs(n, cin, cout, stride, height, width, dtype=torch.float32, device="cpu", ratio=6, seed=0):
    """(x, y, *weights) with weights scaled like folded BN convs of a trained net."""
    gen = torch.Generator().manual_seed(seed)
    mid = cin * ratio

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    x = randn(n, cin, height, width).relu()  # GE inputs follow a ReLU
    y = randn(n, cin, height, width).relu()
    if stride == 1:
        weights = [randn(mid, 1, 3, 3, scale=0.3), randn(mid, scale=0.1), randn(cout, mid, scale=mid**-0.5),
                   randn(cout, scale=0.1)]
    else:
        weights = [randn(mid, 1, 3, 3, scale=0.3), randn(mid, scale=0.1), randn(mid, 1, 3, 3, scale=0.3),
                   randn(mid, scale=0.1), randn(cout, mid, scale=mid**-0.5), randn(cout, scale=0.1),
                   randn(cin, 1, 3, 3, scale=0.3), randn(cin, scale=0.1), randn(cout, cin, scale=cin**-0.5),
                   randn(cout, scale=0.1)]
    return [x, y, *weights]


def fused(stride):
    return ge.ge_layer_stride1 if stride == 1 else ge.ge_layer_stride2


def reference(stride):
    return ge.ge_layer_stride1_reference if stride == 1 else ge.ge_layer_stride2_reference


def reference_float64(stride, args):
    return reference(stride)(*(a.double().cpu() for a in args))


def assert_close_to_scale(actual, expected, rel):
    assert actual.shape == expected.shape
    assert actual.is_contiguous(memory_format=torch.channels_last)
    scale = expected.abs().max().clamp_min(1e-6)
    err = (actual.double().cpu() - expected).abs().max()
    assert err <= rel * scale, f"max error {err:.3g} > {rel} x output scale {scale:.3g}"


def run(backend, stride, args):
    with torch.no_grad(), bf.backends.use(backend):
        return fused(stride)(*args)


# ---- C++ CPU kernel -------------------------------------------------------------------------


@pytest.mark.parametrize("cin,cout,stride", NETWORK_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_network_configs(cin, cout, stride, dtype):
    args = make_inputs(2, cin, cout, stride, 9, 13, dtype)
    assert_close_to_scale(run("cpp", stride, args), reference_float64(stride, args), TOLERANCE[dtype])


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("height,width", [(1, 1), (2, 3), (5, 70), (67, 3)])
def test_cpp_odd_sizes_cross_tiles(stride, height, width):
    # widths > 64 and heights > 4 cross the CPU kernel's tile edges.
    cin, cout = (8, 8) if stride == 1 else (8, 12)
    args = make_inputs(1, cin, cout, stride, height, width, ratio=3)
    assert_close_to_scale(run("cpp", stride, args), reference_float64(stride, args), TOLERANCE[torch.float32])


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpp_low_precision(stride, dtype):
    args = make_inputs(2, 16, 16 if stride == 1 else 32, stride, 7, 9, dtype)
    out = run("cpp", stride, args)
    assert out.dtype == dtype
    assert_close_to_scale(out, reference_float64(stride, args), TOLERANCE[dtype])


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=requires_triton),
                                     pytest.param("cuda", marks=requires_cuda_build)])
def test_layouts(backend, stride, layout, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # GPU GEMMs in IEEE float32
    device = {"cpp": "cpu", "triton": triton_device(), "cuda": "cuda"}[backend]
    args = make_inputs(2, 8, 8 if stride == 1 else 16, stride, 6, 11, device=device)
    expected = reference_float64(stride, args)
    if layout == "channels_last":
        args[0] = args[0].contiguous(memory_format=torch.channels_last)
        args[1] = args[1].contiguous(memory_format=torch.channels_last)
    else:  # non-contiguous views of bigger tensors, weights included
        args = [torch.stack([a, torch.full_like(a, float("nan"))], dim=-1)[..., 0] for a in args]
        assert not args[0].is_contiguous() and not args[2].is_contiguous()
    assert_close_to_scale(run(backend, stride, args), expected, TOLERANCE[torch.float32])


@pytest.mark.parametrize("stride", [1, 2])
def test_cpp_deterministic(stride):
    args = make_inputs(2, 16, 16 if stride == 1 else 32, stride, 11, 75)
    assert torch.equal(run("cpp", stride, args), run("cpp", stride, args))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_cpp_weights_that_require_grad_under_no_grad_with_threads(stride, mode):
    # nn.Parameters (requires_grad=True) are fine under no_grad/inference_mode, whatever the
    # thread count: the kernel's tile GEMMs run in parallel_for's worker threads, which do
    # not inherit the caller's below-autograd dispatch guard; stride 1's projection used to
    # raise "addmm(): functions with out=... arguments don't support automatic
    # differentiation" there, and only with more than one thread.
    cin, cout = (4, 4) if stride == 1 else (4, 8)
    x, y, *weights = make_inputs(1, cin, cout, stride, 16, 16)
    params = [torch.nn.Parameter(w) for w in weights]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with mode(), bf.backends.use("cpp"):
            out = fused(stride)(x, y, *params)
    finally:
        torch.set_num_threads(threads)
    assert_close_to_scale(out, reference_float64(stride, [x, y, *weights]), TOLERANCE[torch.float32])


def test_cpp_general_expansion_ratio():
    args = make_inputs(1, 5, 5, 1, 4, 6, ratio=2)
    assert_close_to_scale(run("cpp", 1, args), reference_float64(1, args), TOLERANCE[torch.float32])


# ---- Registration: schema, fake kernel, torch.compile ---------------------------------------


@pytest.mark.parametrize("stride", [1, 2])
def test_opcheck(stride):
    args = make_inputs(1, 4, 4 if stride == 1 else 8, stride, 5, 6)
    op = torch.ops.bisenet_fast.ge_layer_stride1 if stride == 1 else torch.ops.bisenet_fast.ge_layer_stride2
    torch.library.opcheck(op.default, args, test_utils=("test_schema", "test_faketensor"))
    assert_fake_kernel_refuses_mixed_devices(op, args)


@pytest.mark.parametrize("stride", [1, 2])
def test_compile_fullgraph_uses_fake_kernel(stride):
    torch._dynamo.reset()
    args = make_inputs(1, 4, 4 if stride == 1 else 8, stride, 5, 7)
    op = torch.ops.bisenet_fast.ge_layer_stride1 if stride == 1 else torch.ops.bisenet_fast.ge_layer_stride2

    def block(x, y, *weights):
        return op(x, y, *weights) * 2.0

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(*args)
    assert_close_to_scale(out / 2.0, reference_float64(stride, args), TOLERANCE[torch.float32])


# ---- Triton (interpreted on the CPU, native on a GPU) ---------------------------------------


@requires_triton
@pytest.mark.parametrize("cin,cout,stride", [(4, 4, 1), (4, 8, 2), (16, 32, 2), (32, 32, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_matches_reference(cin, cout, stride, dtype):
    args = make_inputs(2 if cin == 4 else 1, cin, cout, stride, 3, 5, dtype, device=triton_device())
    out = run("triton", stride, args)
    assert out.dtype == dtype
    assert_close_to_scale(out, reference_float64(stride, args), TOLERANCE[dtype])


@requires_triton
@pytest.mark.parametrize("cin,cout,stride", [(4, 4, 1), (4, 8, 2)])
@pytest.mark.parametrize("height,width,block_p", [(3, 5, 16), (33, 67, 64)])
def test_triton_pixel_blocks(cin, cout, stride, height, width, block_p):
    """Both pixel-block sizes (16 where 64-pixel blocks would leave SMs idle), over many
    programs with a partial last block, and the expanded tensor of stride 2 at odd sizes."""
    from bisenet_fast.triton_kernels import ge_layer as ge_triton

    args = make_inputs(2, cin, cout, stride, height, width, device=triton_device())
    out_pixels = 2 * ((height - 1) // stride + 1) * ((width - 1) // stride + 1)
    if not CUDA:  # on a GPU the block also depends on its SM count
        assert ge_triton._block_p(out_pixels, torch.device("cpu")) == block_p
    assert_close_to_scale(run("triton", stride, args), reference_float64(stride, args), TOLERANCE[torch.float32])


@pytest.mark.parametrize("blocks,k_items,splits", [(512, 6, 1), (264, 24, 1), (128, 6, 3), (128, 24, 3),
                                                    (100, 24, 3), (32, 6, 6), (32, 24, 12), (1, 5, 5)])
def test_k_splits_give_every_sm_two_programs(blocks, k_items, splits, monkeypatch):
    """With an H200's 132 SMs: no split where the pixel blocks fill the SMs twice; else the
    fewest splits that do, as a divisor of the K loop's items; at most one per item. The
    1024x2048 deep layers (128 blocks of 16 pixels, 6 values of r or 24 chunks of mid) get 3."""
    from bisenet_fast.triton_kernels import ge_layer as ge_triton

    monkeypatch.setattr(ge_triton, "INTERPRETER_SMS", 132)
    assert ge_triton._k_splits(blocks, k_items, torch.device("cpu")) == splits


@pytest.mark.parametrize("block_p,cout,dtype,warps", [(64, 32, torch.float16, 4), (64, 64, torch.bfloat16, 4),
                                                     (64, 128, torch.float16, 8), (64, 32, torch.float32, 8),
                                                     (16, 32, torch.float16, 4), (16, 128, torch.float32, 4)])
def test_warps_per_block(block_p, cout, dtype, warps):
    """64-pixel blocks take 4 warps (each expanded value computed once) where their build fits
    in registers: 16-bit dtypes up to 64 output channels; else 8 (tests/triton_sm90.py checks
    that every build is spill-free). 16-pixel blocks take 4."""
    from bisenet_fast.triton_kernels import ge_layer as ge_triton

    assert ge_triton._warps(block_p, cout, dtype) == warps


@requires_triton
@pytest.mark.parametrize("cin,cout,stride,k_items", [(16, 16, 1, 6), (32, 40, 2, 12)])
@pytest.mark.parametrize("sms,splits", [(1, 1), (3, 2), (8, 6)])
def test_triton_split_k_loop(cin, cout, stride, k_items, sms, splits, monkeypatch):
    """The K loop split over 1, 2 and 6 programs (partial sums added by a second kernel): for
    stride 1 over the 6 values of r, for stride 2 over the 12 chunks of mid and the shortcut's
    2 chunks (so with 6 splits four get none); 48 output pixels, 3 blocks of 16. Against the
    reference, and deterministic."""
    from bisenet_fast.triton_kernels import ge_layer as ge_triton

    monkeypatch.setattr(ge_triton, "INTERPRETER_SMS", sms)
    args = make_inputs(1, cin, cout, stride, 8 * stride, 6 * stride, device=triton_device())
    if not CUDA:  # on a GPU the blocks and splits depend on its SM count
        assert ge_triton._block_p(48, torch.device("cpu")) == ge_triton.SMALL_BLOCK_P
        assert ge_triton._k_splits(3, k_items, torch.device("cpu")) == splits
    out = run("triton", stride, args)
    assert_close_to_scale(out, reference_float64(stride, args), TOLERANCE[torch.float32])
    assert torch.equal(run("triton", stride, args), out)


@requires_triton
@pytest.mark.parametrize("cin,cout,stride", NETWORK_CONFIGS)
def test_triton_network_configs(cin, cout, stride):
    """The network's channel counts (up to 8 blocks of 16 input channels, 768 expanded ones)
    in float16; under the interpreter stride 1 takes the 64-pixel blocks here, stride 2 (a
    quarter of the output pixels) the 16-pixel ones."""
    args = make_inputs(1, cin, cout, stride, 24, 40, torch.float16, device=triton_device())
    assert_close_to_scale(run("triton", stride, args), reference_float64(stride, args), TOLERANCE[torch.float16])


@requires_triton
@pytest.mark.parametrize("cin,cout,stride,ratio", [(40, 40, 1, 6), (40, 24, 2, 6), (5, 5, 1, 2), (3, 7, 2, 3)])
def test_triton_channel_blocks_and_ratios(cin, cout, stride, ratio):
    """Input channels over more than one 32-channel block (the last one partial), fewer than
    16, and expansion ratios other than 6: the packed channel order for any mid = k * cin."""
    args = make_inputs(1, cin, cout, stride, 5, 7, device=triton_device(), ratio=ratio)
    assert_close_to_scale(run("triton", stride, args), reference_float64(stride, args), TOLERANCE[torch.float32])


@pytest.mark.parametrize("ratio", [1, 3, 6])
def test_packed_channel_order(ratio):
    """pack_triton_*: expanded channel m = c * ratio + r (PyTorch's grouped-conv order) lands
    at r * cin + c, in the 3x3 weights, their bias and the projection's rows alike."""
    cin = cout = 4  # stride 1: a residual layer
    mid = cin * ratio
    dw_weight = torch.arange(mid * 9, dtype=torch.float32).reshape(mid, 1, 3, 3)
    dw_bias = torch.arange(mid, dtype=torch.float32)
    pw_weight = torch.arange(cout * mid, dtype=torch.float32).reshape(cout, mid)
    dw_packed, bias_packed, pw_packed, _ = ge.pack_triton_stride1(dw_weight, dw_bias, pw_weight, torch.zeros(cout))
    for c in range(cin):
        for r in range(ratio):
            m, packed = c * ratio + r, r * cin + c
            assert torch.equal(dw_packed[:, packed], dw_weight[m].flatten())
            assert bias_packed[packed] == dw_bias[m]
            assert torch.equal(pw_packed[packed], pw_weight[:, m])


@requires_triton
@pytest.mark.parametrize("stride", [1, 2])
def test_triton_prepacked_weights(stride):
    """triton_weights (packed once, as FusedGELayer does) give the per-call packing's result;
    packed weights of the wrong count or shape are refused by name."""
    x, y, *weights = make_inputs(1, 4, 4 if stride == 1 else 8, stride, 3, 5, device=triton_device())
    pack = ge.pack_triton_stride1 if stride == 1 else ge.pack_triton_stride2
    packed = pack(*weights)
    with torch.no_grad(), bf.backends.use("triton"):
        assert torch.equal(fused(stride)(x, y, *weights, triton_weights=packed), fused(stride)(x, y, *weights))
        with pytest.raises(TypeError, match="triton_weights must be the"):
            fused(stride)(x, y, *weights, triton_weights=packed[:-1])
        with pytest.raises(ValueError, match=r"triton_weights\[2\] must have shape"):
            fused(stride)(x, y, *weights, triton_weights=(*packed[:2], packed[2].t(), *packed[3:]))
        with pytest.raises(ValueError, match=r"triton_weights\[2\] must be contiguous"):
            strided = packed[2].new_empty(packed[2].shape[::-1]).t().copy_(packed[2])
            fused(stride)(x, y, *weights, triton_weights=(*packed[:2], strided, *packed[3:]))


@requires_triton
def test_triton_rejects_float64():
    args = make_inputs(1, 4, 4, 1, 3, 3, torch.float64, device=triton_device())
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        run("triton", 1, args)


@requires_triton
@pytest.mark.parametrize("stride", [1, 2])
def test_triton_custom_op_fake(stride):
    x, y, *weights = make_inputs(1, 4, 4 if stride == 1 else 8, stride, 3, 4, device=triton_device())
    pack = ge.pack_triton_stride1 if stride == 1 else ge.pack_triton_stride2
    op = torch.ops.bisenet_fast_triton.ge_layer_stride1 if stride == 1 else torch.ops.bisenet_fast_triton.ge_layer_stride2
    torch.library.opcheck(op.default, (x, y, *pack(*weights)), test_utils=("test_schema", "test_faketensor"))
    assert_fake_kernel_refuses_mixed_devices(op, (x, y, *pack(*weights)))


@requires_cuda
@pytest.mark.parametrize("cin,cout,stride", NETWORK_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_network_configs_on_gpu(cin, cout, stride, dtype, monkeypatch):
    # float32 projections: 3xTF32 dots with TF32 off, held to the fused model's 1e-4 bar; with
    # it on (PyTorch's default for cuDNN convs) TF32 dots, ~1e-3 like eager convs.
    args = make_inputs(2, cin, cout, stride, 33, 67, dtype, device="cuda")
    if dtype == torch.float32:
        for allow_tf32, rel in ((False, 1e-4), (True, 5e-3)):
            monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow_tf32)
            assert_close_to_scale(run("triton", stride, args), reference_float64(stride, args), rel)
    else:
        assert_close_to_scale(run("triton", stride, args), reference_float64(stride, args), TOLERANCE[dtype])


# ---- CUDA kernels: their block code emulated on the CPU, and native on a GPU ---------------
# tests/cuda_emulation compiles csrc/cuda/ge_layer_block.cuh and ge_layer_host.h (all of
# ge_layer.cu but the kernel launch) for the CPU and runs each block's 256 threads as fibers
# switched at every barrier, in an order shuffled anew at each, shared memory starting as
# NaN, wmma emulated.

H200_SMS = 132
# float32's two GEMMs: FMAs (exact float32; TF32 off, or a GPU without tensor cores) and
# TF32 tensor cores (TF32 on, PyTorch's default for cuDNN convs), with their tolerances.
FLOAT32_GEMMS = {"fma": 1e-5, "tf32": 5e-3}


def run_emulated(stride, args, sm_count=H200_SMS, tensor_cores=True):
    from tests import cuda_emulation

    module = cuda_emulation.ge_layer()
    return (module.ge_layer_stride1 if stride == 1 else module.ge_layer_stride2)(*args, sm_count, tensor_cores)


def emulated_plan(stride, n, out_h, out_w, cin, ratio, cout, sm_count=H200_SMS, tensor_cores=False, operand_bytes=4):
    from tests import cuda_emulation

    return cuda_emulation.ge_layer().plan(stride, n, out_h, out_w, cin, ratio, cout, sm_count, tensor_cores,
                                          operand_bytes)


@pytest.fixture(params=sorted(FLOAT32_GEMMS))
def float32_gemm(request, monkeypatch):
    """Runs a float32 test with each GEMM; yields its tolerance."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", request.param == "tf32")
    return FLOAT32_GEMMS[request.param]


@pytest.mark.parametrize("cin,cout,stride", NETWORK_CONFIGS)
def test_cuda_emulated_network_configs(cin, cout, stride, float32_gemm):
    """Every GE layer's channels (up to 24 chunks of 32 expanded channels, two shortcut
    chunks at cin 64) on several 8x8 tiles with partial ones at the edges."""
    args = make_inputs(2, cin, cout, stride, 9 * stride, 11 * stride)
    assert_close_to_scale(run_emulated(stride, args), reference_float64(stride, args), float32_gemm)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("height,width", [(1, 1), (2, 3), (17, 8), (8, 17), (33, 20)])
def test_cuda_emulated_tile_edges(stride, height, width, monkeypatch):
    """Images smaller than a tile, and tiles cut by the bottom and right edges: the halos'
    zero padding (stride 2: also dw0's output outside the map, dw1's padding)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    args = make_inputs(1, 4, 4 if stride == 1 else 8, stride, height, width, ratio=3)
    assert_close_to_scale(run_emulated(stride, args), reference_float64(stride, args), TOLERANCE[torch.float32])


@pytest.mark.parametrize("cin,cout,stride,ratio", [(40, 40, 1, 6), (40, 24, 2, 6), (5, 5, 1, 2), (3, 7, 2, 3),
                                                   (33, 33, 1, 1), (33, 20, 2, 1)])
def test_cuda_emulated_chunks_and_ratios(cin, cout, stride, ratio, float32_gemm):
    """Chunks of 32 expanded channels that start inside an input channel's expansion and a
    partial last chunk; ratio 1 (a chunk reads 32 input channels, the halo's most); cin 40
    and 33: a partial second shortcut chunk."""
    args = make_inputs(1, cin, cout, stride, 10, 9, ratio=ratio)
    assert_close_to_scale(run_emulated(stride, args), reference_float64(stride, args), float32_gemm)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("cout,out_per_thread,cout_tiles", [(128, 8, 1), (64, 4, 1), (40, 4, 1), (136, 8, 2)])
def test_cuda_emulated_output_tiles(stride, cout, out_per_thread, cout_tiles, float32_gemm):
    """Each output-channel tile width (2, 4, 8 outputs per thread: 1, 2, 4 wmma tiles per
    warp), and several tiles with a partial last one."""
    cin = cout if stride == 1 else 8
    args = make_inputs(1, cin, cout, stride, 6 * stride, 7 * stride, ratio=2)
    plan = emulated_plan(stride, 1, 6, 7, cin, 2, cout, sm_count=1)
    assert (plan["out_per_thread"], plan["cout_tiles"], plan["k_splits"]) == (out_per_thread, cout_tiles, 1)
    assert_close_to_scale(run_emulated(stride, args, sm_count=1), reference_float64(stride, args), float32_gemm)


@pytest.mark.parametrize("cin,cout,stride,sm_count,k_splits", [(64, 64, 1, 6, 6), (64, 64, 1, 2, 2),
                                                               (64, 64, 1, 100, 12), (40, 24, 2, 5, 5),
                                                               (40, 24, 2, 100, 10)])
def test_cuda_emulated_split_k(cin, cout, stride, sm_count, k_splits, float32_gemm):
    """One tile (8x8 outputs) on a GPU of sm_count SMs: the K loop split over k_splits
    blocks (at most one per chunk: 12 of mid = 384 at stride 1; 8 of mid = 240 and 2 of the
    shortcut at stride 2, where some splits get a shortcut chunk and some none), the last
    to arrive summing the partials in split order. Deterministic."""
    args = make_inputs(1, cin, cout, stride, 8 * stride, 7 * stride)
    plan = emulated_plan(stride, 1, 8, 7, cin, 6, cout, sm_count)
    assert (plan["tiles"], plan["k_splits"]) == (1, k_splits)
    out = run_emulated(stride, args, sm_count)
    assert_close_to_scale(out, reference_float64(stride, args), float32_gemm)
    assert torch.equal(run_emulated(stride, args, sm_count), out)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cout_per_layer", [16, 128])
def test_cuda_emulated_low_precision(stride, dtype, cout_per_layer):
    """16-bit inputs multiply on tensor cores: 1 and 4 wmma tiles per warp."""
    cin = cout_per_layer if stride == 1 else 16
    args = make_inputs(2, cin, cout_per_layer if stride == 1 else 2 * cout_per_layer, stride, 7, 9, dtype)
    out = run_emulated(stride, args, sm_count=1)
    assert out.dtype == dtype
    assert_close_to_scale(out, reference_float64(stride, args), TOLERANCE[dtype])


@pytest.mark.parametrize("stride", [1, 2])
def test_cuda_emulated_without_tensor_cores(stride, monkeypatch):
    """A GPU before sm_80: float32 takes the FMA GEMM even with TF32 allowed; 16-bit inputs
    are refused by name rather than run by a kernel that does not exist there."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    args = make_inputs(1, 8, 8 if stride == 1 else 16, stride, 6, 11)
    assert_close_to_scale(run_emulated(stride, args, tensor_cores=False), reference_float64(stride, args),
                          TOLERANCE[torch.float32])
    with pytest.raises(RuntimeError, match="compute capability 8.0"):
        run_emulated(stride, [a.half() for a in args], tensor_cores=False)


@pytest.mark.parametrize("stride", [1, 2])
def test_cuda_emulated_layouts(stride, monkeypatch):
    """NCHW, channels_last and non-contiguous inputs and weights give one result."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    args = make_inputs(2, 8, 8 if stride == 1 else 16, stride, 6, 11)
    expected = run_emulated(stride, args)
    channels_last = [a.contiguous(memory_format=torch.channels_last) if a.dim() == 4 else a for a in args]
    sliced = [torch.stack([a, torch.full_like(a, float("nan"))], dim=-1)[..., 0] for a in args]
    assert torch.equal(run_emulated(stride, channels_last), expected)
    assert torch.equal(run_emulated(stride, sliced), expected)
    assert_close_to_scale(expected, reference_float64(stride, args), TOLERANCE[torch.float32])


def test_cuda_emulated_bad_inputs():
    x, y, *weights = make_inputs(1, 4, 4, 1, 3, 3)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        run_emulated(1, [x.double(), y.double(), *(w.double() for w in weights)])
    with pytest.raises(TypeError, match="pw_bias must have x's dtype"):
        run_emulated(1, [x, y, *weights[:3], weights[3].half()])
    with pytest.raises(ValueError, match=r"y \(conv1's output\) must have x's shape"):
        run_emulated(1, [x, y[:, :, :2], *weights])
    with pytest.raises(ValueError, match=r"pw_weight must have shape \(cin, mid\)"):
        run_emulated(1, [x, y, *weights[:2], weights[2][:3], weights[3]])
    x, y, *weights = make_inputs(1, 4, 8, 2, 3, 3)
    with pytest.raises(ValueError, match=r"sc_pw_weight must have shape \(cout, cin\) = \[8, 4\], got \[7, 4\]"):
        run_emulated(2, [x, y, *weights[:8], weights[8][:7], weights[9]])
    with pytest.raises(ValueError, match="x must have a non-empty spatial size"):
        run_emulated(2, [x[:, :, :0], y[:, :, :0], *weights])
    assert run_emulated(2, [x[:0], y[:0], *weights]).shape == (0, 8, 2, 2)  # an empty batch is fine
    with pytest.raises(ValueError, match="x must have at least one channel"):
        run_emulated(2, [x[:, :0], y[:, :0], *weights])
    with pytest.raises(ValueError, match=r"sc_dw_bias must have shape \(cin\) = \[4\], got \[1\]"):
        run_emulated(2, [x, y, *weights[:7], weights[7][:1], *weights[8:]])


@pytest.mark.parametrize("stride", [1, 2])
def test_cuda_emulated_nan_propagates_as_in_the_reference(stride):
    args = make_inputs(1, 4, 4 if stride == 1 else 8, stride, 6, 7)
    args[1][0, 1, 2, 3] = float("nan")
    expected = reference(stride)(*args)
    assert expected.isnan().any()
    assert torch.equal(run_emulated(stride, args).isnan(), expected.isnan())


@pytest.mark.parametrize("ratio", [1, 2, 6])
@pytest.mark.parametrize("cout", [16, 128, 512])
@pytest.mark.parametrize("tensor_cores,operand_bytes", [(False, 4), (True, 4), (True, 2)])
def test_cuda_plan_fits_every_gpu_arch(ratio, cout, tensor_cores, operand_bytes):
    """A block's shared memory stays within sm_86/sm_89's 99 KB opt-in limit (the smallest
    of the built architectures) for any ratio and width: ratio 1 stages the most input
    channels (33), 8 outputs per thread the widest weight and epilogue tiles."""
    for stride in (1, 2):
        plan = emulated_plan(stride, 1, 64, 64, 256, ratio, cout, 1, tensor_cores, operand_bytes)
        assert plan["shared_bytes"] <= 99 * 1024


def test_cuda_plan_at_the_network_shapes():
    """1x1024x2048 on an H200: the 1/32 layers have 32 tiles of 8x8 outputs, so their K loop
    splits over 5 blocks (160 blocks for 132 SMs); the 1/8 layers' 512 tiles need no split.
    Output tiles cover cout (up to 128 channels) rather than narrowing, which would
    recompute the grouped conv per tile."""
    plan = emulated_plan(1, 1, 32, 64, 128, 6, 128)
    assert (plan["tiles"], plan["cout_tiles"], plan["k_splits"]) == (32, 1, 5)
    plan = emulated_plan(2, 1, 32, 64, 64, 6, 128)
    assert (plan["tiles"], plan["cout_tiles"], plan["k_splits"]) == (32, 1, 5)
    plan = emulated_plan(2, 1, 128, 256, 16, 6, 32)
    assert (plan["tiles"], plan["cout_tiles"], plan["out_per_thread"], plan["k_splits"]) == (512, 1, 2, 1)


@requires_cuda_build
@pytest.mark.parametrize("cin,cout,stride", NETWORK_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_network_configs_on_gpu(cin, cout, stride, dtype, monkeypatch):
    # float32: FMAs with TF32 off, held to the fused model's 1e-4 bar; TF32 tensor cores with
    # it on, ~1e-3 like eager convs.
    args = make_inputs(2, cin, cout, stride, 33, 67, dtype, device="cuda")
    cases = ((False, 1e-4), (True, 5e-3)) if dtype == torch.float32 else ((True, TOLERANCE[dtype]),)
    for allow_tf32, rel in cases:
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow_tf32)
        out = run("cuda", stride, args)
        assert_close_to_scale(out, reference_float64(stride, args), rel)
        assert torch.equal(run("cuda", stride, args), out)


@requires_cuda_build
@pytest.mark.parametrize("stride", [1, 2])
def test_cuda_matches_its_emulation(stride, monkeypatch):
    """The GPU runs the block code as the CPU emulation does: equal up to FMA contraction."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    args = make_inputs(1, 40, 40 if stride == 1 else 24, stride, 21, 30, ratio=6)
    emulated = run_emulated(stride, args, torch.cuda.get_device_properties(0).multi_processor_count)
    on_gpu = run("cuda", stride, [a.cuda() for a in args]).cpu()
    assert_close_to_scale(on_gpu, emulated.double(), 1e-6)


@requires_cuda_build
def test_cuda_rejects_float64():
    args = make_inputs(1, 4, 4, 1, 3, 3, torch.float64, device="cuda")
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        run("cuda", 1, args)


# ---- Bad input: the same clear error whatever the backend -----------------------------------


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_bad_inputs(backend):
    good1 = make_inputs(1, 4, 4, 1, 3, 3)
    good2 = make_inputs(1, 4, 8, 2, 3, 3)
    cases = [
        (1, lambda a: a.__setitem__(0, a[0][0]), ValueError, "x must be 4-D"),
        (1, lambda a: a.__setitem__(1, a[1].double()), TypeError, "y must have dtype in \\(float32\\)"),
        (1, lambda a: a.__setitem__(1, a[1][:, :, :2]), ValueError, "y \\(conv1's output\\) must have x's shape"),
        (1, lambda a: a.__setitem__(2, a[2][:23]), ValueError, "dw_weight must have shape \\(k \\* 4, 1, 3, 3\\)"),
        (1, lambda a: a.__setitem__(4, a[4][:3]), ValueError, "pw_weight must have shape \\(4, 24\\)"),
        (1, lambda a: a.__setitem__(5, a[5].half()), TypeError, "pw_bias must have dtype"),
        (1, lambda a: a.__setitem__(0, torch.ones(1, 4, 0, 3)) or a.__setitem__(1, torch.ones(1, 4, 0, 3)),
         ValueError, "x must be non-empty"),
        (2, lambda a: a.__setitem__(6, a[6][:, :5]), ValueError, "pw_weight must have shape \\(cout, 24\\)"),
        (2, lambda a: a.__setitem__(8, a[8][:3]), ValueError, "sc_dw_weight must have shape \\(4, 1, 3, 3\\)"),
        (2, lambda a: a.__setitem__(10, a[10][:7]), ValueError, "sc_pw_weight must have shape \\(8, 4\\)"),
        (2, lambda a: a.__setitem__(3, a[3].to(torch.int32)), TypeError, "dw0_bias must have dtype"),
        (1, lambda a: a.__setitem__(1, a[1].to("meta")), ValueError, "y must be on cpu like the other inputs, got meta"),
        (2, lambda a: a.__setitem__(10, a[10].to("meta")), ValueError, "sc_pw_weight must be on cpu like the other"),
    ]
    for stride, corrupt, error, message in cases:
        args = list(good1 if stride == 1 else good2)
        corrupt(args)
        with pytest.raises(error, match=message), bf.backends.use(backend):
            fused(stride)(*args)


@pytest.mark.parametrize("stride, index, corrupt, error, message", [
    (1, 2, lambda w: w[:23], ValueError, "dw_weight must have shape \\(k \\* 4, 1, 3, 3\\)"),
    (1, 3, lambda w: w[:5], ValueError, "dw_bias must have shape \\(24,\\)"),
    (1, 4, lambda w: w[:, :, None, None], ValueError, "pw_weight must be 2-D"),
    (1, 4, lambda w: w[:0], ValueError, "pw_weight must have shape \\(cin, mid\\) with cin > 0"),
    (1, 5, lambda w: w.tolist(), TypeError, "pw_bias must be a torch.Tensor"),
    (2, 2, lambda w: w[:23], ValueError, "dw0_weight must have shape \\(k \\* 4, 1, 3, 3\\)"),
    (2, 6, lambda w: w[:, :5], ValueError, "pw_weight must have shape \\(cout, 24\\)"),
    (2, 8, lambda w: w[:0], ValueError, "sc_dw_weight must have shape \\(cin, 1, 3, 3\\) with cin > 0"),
    (2, 10, lambda w: w[:7], ValueError, "sc_pw_weight must have shape \\(8, 4\\)"),
    (2, 11, lambda w: w.double(), TypeError, "sc_pw_bias must have dtype"),
])
def test_packing_names_a_bad_weight(stride, index, corrupt, error, message):
    # pack_triton_* is public (FusedGELayer's triton_weights); mismatched weights failed in a
    # reshape or a division by zero, or were packed with a wrong expansion ratio
    args = make_inputs(1, 4, 4 if stride == 1 else 8, stride, 3, 3)
    args[index] = corrupt(args[index])
    pack = ge.pack_triton_stride1 if stride == 1 else ge.pack_triton_stride2
    with pytest.raises(error, match=message):
        pack(*args[2:])


CORRUPTIONS = {
    "short": lambda t: t[..., :1],
    "reshaped": lambda t: t.reshape(1, -1),
    "dtype": lambda t: t.double(),
    "device": lambda t: t.to("meta"),
    "parameter": torch.nn.Parameter,  # a subclass: passes the checks, but only the detailed ones
}
# What the detailed checks' message says was expected, per corruption.
EXPECTED = {"short": "must have (x's )?shape", "reshaped": "must be 4-D|must have shape", "dtype": "must have dtype",
            "device": "must be on cpu like|must be on meta like"}
ARGUMENT_NAMES = {1: ge.STRIDE1_ARGUMENTS, 2: ge.STRIDE2_ARGUMENTS}  # the schemas'


def assert_names_the_argument(error, name, corruption):
    """x is what the others are checked against: a bad x is reported as y unlike it."""
    message = str(error.value)
    named = rf"(^|\W)(x|y)\W" if name == "x" else rf"(^|\W){re.escape(name)}\W"
    assert re.search(named, message) and re.search(EXPECTED[corruption], message), message


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_fast_checks_pass_nothing_the_detailed_checks_refuse(stride, corruption):
    """The one-pass checks that let good calls skip the detailed ones (check_stride*_inputs,
    the packed-weight check) say no for every argument corrupted in any of these ways, so a
    bad call always reaches the checks that name it."""
    args = make_inputs(1, 4, 4 if stride == 1 else 8, stride, 3, 3)
    valid, check = (ge._stride1_valid, ge.check_stride1_inputs) if stride == 1 else (ge._stride2_valid, ge.check_stride2_inputs)
    packed = list((ge.pack_triton_stride1 if stride == 1 else ge.pack_triton_stride2)(*args[2:]))
    shapes = [tuple(t.shape) for t in packed]
    assert valid(*args)
    with torch.no_grad():
        for index in range(len(args)):
            bad = list(args)
            bad[index] = CORRUPTIONS[corruption](bad[index])
            assert not valid(*bad), index
            if corruption != "parameter":
                with pytest.raises((ValueError, TypeError)) as error:
                    check(*bad)
                assert_names_the_argument(error, ARGUMENT_NAMES[stride][index], corruption)
        for index in range(len(packed)):
            bad = list(packed)
            bad[index] = CORRUPTIONS[corruption](bad[index])
            if corruption == "parameter":
                ge._check_triton_weights("op", bad, shapes, args[0])
            else:
                with pytest.raises((ValueError, TypeError)) as error:
                    ge._check_triton_weights("op", bad, shapes, args[0])
                assert_names_the_argument(error, f"triton_weights[{index}]", corruption)


@pytest.mark.parametrize("stride", [1, 2])
def test_requires_grad_raises_naming_the_input(stride):
    for index, name in enumerate(ARGUMENT_NAMES[stride]):
        args = make_inputs(1, 4, 4 if stride == 1 else 8, stride, 3, 3)
        args[index].requires_grad_(True)
        with pytest.raises(RuntimeError, match=f"ge_layer_stride{stride} is inference-only .* but {name} requires grad"):
            fused(stride)(*args)


@requires_triton
@pytest.mark.parametrize("stride", [1, 2])
def test_raw_triton_op_names_its_arguments(stride):
    """Called directly, the Triton op's checks (and its fake kernel's) use the schema's names."""
    args = make_inputs(1, 4, 4 if stride == 1 else 8, stride, 3, 3, device=triton_device())
    packed = list((ge.pack_triton_stride1 if stride == 1 else ge.pack_triton_stride2)(*args[2:]))
    op = getattr(torch.ops.bisenet_fast_triton, f"ge_layer_stride{stride}")
    for index, name in enumerate(ARGUMENT_NAMES[stride][2:]):
        bad = list(packed)
        bad[index] = bad[index][..., :1]
        with torch.no_grad(), pytest.raises(ValueError, match=f"(^|: ){name} must (have shape|be packed|be contiguous)"):
            op(*args[:2], *bad)
        bad[index] = packed[index].to("meta")  # dispatched to the fake kernel, which checks devices
        with torch.no_grad(), pytest.raises(ValueError, match=f"{name} is on meta"):
            op(*args[:2], *bad)


@pytest.mark.skipif(CUDA, reason="checks the error raised where the cuda backend does not exist")
def test_forcing_cuda_backend_without_cuda_raises():
    with pytest.raises(bf.backends.BackendUnavailableError):
        with bf.backends.use("cuda"):
            pass


# ---- NaN, and the raw torch.ops entry points ---------------------------------------------------


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=requires_triton)])
@pytest.mark.parametrize("stride", [1, 2])
def test_nan_propagates_as_in_the_reference(backend, stride):
    """A NaN input gives NaN where the reference gives it (relu keeps NaN), never a silent 0."""
    device = "cpu" if backend == "cpp" else triton_device()
    args = make_inputs(1, 4, 4 if stride == 1 else 8, stride, 6, 7, device=device)
    args[1][0, 1, 2, 3] = float("nan")
    with torch.no_grad():
        expected = reference(stride)(*args)
    assert expected.isnan().any()
    assert torch.equal(run(backend, stride, args).isnan(), expected.isnan())


RAW_BIASES = {1: {3: "dw_bias", 5: "pw_bias"},
              2: {3: "dw0_bias", 5: "dw1_bias", 7: "pw_bias", 9: "sc_dw_bias", 11: "sc_pw_bias"}}


@pytest.mark.parametrize("stride", [1, 2])
def test_raw_cpp_op_checks_every_argument(stride):
    """torch.ops.bisenet_fast.* called directly (no Python front): clear errors, no crash, no
    read past a short bias."""
    op = torch.ops.bisenet_fast.ge_layer_stride1 if stride == 1 else torch.ops.bisenet_fast.ge_layer_stride2
    good = make_inputs(1, 4, 4 if stride == 1 else 8, stride, 3, 3)
    with torch.no_grad():
        no_channels = [torch.ones(1, 0, 3, 3), torch.ones(1, 0, 3, 3), *good[2:]]
        with pytest.raises(ValueError, match="x must have at least one channel"):
            op(*no_channels)
        for index, name in RAW_BIASES[stride].items():
            args = list(good)
            args[index] = args[index][:1]
            with pytest.raises(ValueError, match=rf"{name} must have shape \(\w+\) = \[\d+\], got \[1\]"):
                op(*args)
            args[index] = good[index].reshape(1, -1)  # the right number of values is not enough
            with pytest.raises(ValueError, match=rf"{name} must have shape \(\w+\) = \[\d+\], got \[1, \d+\]"):
                op(*args)
        for index in (2,) if stride == 1 else (2, 4):
            args = list(good)
            args[index] = args[index].reshape(args[index].shape[0], 1, 9, 1)
            with pytest.raises(ValueError, match=r"dw[01]?_weight must have shape \((k\*cin|mid), 1, 3, 3\)"):
                op(*args)
    args = list(good)
    args[2] = args[2].clone().requires_grad_()
    with pytest.raises(RuntimeError, match=f"ge_layer_stride{stride} is inference-only .* dw0?_weight requires grad"):
        op(*args)


@pytest.mark.parametrize("stride", [1, 2])
def test_cpp_output_is_an_ordinary_tensor(stride):
    """Not an inference tensor: usable in place and by autograd after a torch.no_grad() call."""
    out = run("cpp", stride, make_inputs(1, 4, 4 if stride == 1 else 8, stride, 3, 3))
    assert not out.is_inference()
    weight = torch.ones_like(out, requires_grad=True)
    (out.add_(1) * weight).sum().backward()
    assert torch.equal(weight.grad, out)


@requires_triton
@pytest.mark.parametrize("stride", [1, 2])
def test_raw_triton_op_checks_its_packed_weights(stride):
    args = make_inputs(1, 4, 4 if stride == 1 else 8, stride, 3, 3, device=triton_device())
    pack = ge.pack_triton_stride1 if stride == 1 else ge.pack_triton_stride2
    op = torch.ops.bisenet_fast_triton.ge_layer_stride1 if stride == 1 else torch.ops.bisenet_fast_triton.ge_layer_stride2
    packed = list(pack(*args[2:]))
    with torch.no_grad():
        short = packed[:2] + [packed[2][:-1]] + packed[3:]  # one row of the next weight missing
        with pytest.raises(ValueError, match=f"{ARGUMENT_NAMES[stride][4]} must have shape"):
            op(args[0], args[1], *short)
        with pytest.raises(ValueError, match=r"y \(conv1's output\) must have x's shape"):
            op(args[0], args[1][:, :, :2], *packed)


# ---- CUDA emulation: cases a mutation run of the CUDA kernels showed untested


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("tf32", [False, True], ids=["fma", "tf32"])
def test_emulated_split_k_with_several_cout_tiles(stride, tf32, monkeypatch):
    """Split K where a tile row also has several output-channel tiles (cout 136: 2 tiles of
    128) and there are several pixel tiles: the partial sums' split stride and the arrival
    counters are indexed per (pixel tile, cout tile). No other test splits K with cout_tiles > 1."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    cin = 136 if stride == 1 else 8
    args = make_inputs(1, cin, 136, stride, 9 * stride, 8 * stride, ratio=1 if stride == 1 else 6)
    plan = emulated_plan(stride, 1, 9, 8, cin, 1 if stride == 1 else 6, 136, sm_count=16)
    assert plan["tiles"] == 2 and plan["cout_tiles"] == 2 and plan["k_splits"] > 1, plan
    out = run_emulated(stride, args, sm_count=16)
    assert_close_to_scale(out, reference_float64(stride, args), 5e-3 if tf32 else 1e-5)


def chunk_channels(cin, ratio):
    mid = cin * ratio
    return max((min(m0 + 32, mid) - 1) // ratio - m0 // ratio + 1 for m0 in range(0, mid, 32))


@pytest.mark.parametrize("stride", [1, 2])
def test_emulated_plan_halo_channels_cover_every_chunk(stride):
    """The staged halo has a row for every input channel any chunk of 32 expanded channels
    reads (ratio 3: a chunk starting at m0 = 32 reads channels 10..21, 12 of them)."""
    for ratio in range(1, 13):
        for cin in (1, 2, 5, 11, 12, 13, 40, 64, 100):
            plan = emulated_plan(stride, 1, 8, 8, cin, ratio, 32)
            assert plan["halo_channels"] >= chunk_channels(cin, ratio), (ratio, cin, plan)


def test_emulated_ratio_3_wide_chunks():
    """End to end, the case the plan test above guards (ASan would also report the overflow)."""
    args = make_inputs(1, 24, 24, 1, 9, 10, ratio=3)
    assert_close_to_scale(run_emulated(1, args, tensor_cores=False), reference_float64(1, args), 1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_emulated_float32_gemm_follows_cudnn_tf32_flag(stride, monkeypatch):
    """float32 takes TF32 tensor cores exactly when torch.backends.cudnn.allow_tf32 is set
    (the flag cuDNN's convs follow), whatever the cuBLAS (matmul) flag says."""
    args = make_inputs(1, 16, 16 if stride == 1 else 32, stride, 8 * stride, 8 * stride)
    fma = run_emulated(stride, args, tensor_cores=False)
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
        tf32 = run_emulated(stride, args)
        matmul.allow_tf32 = True
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        not_tf32 = run_emulated(stride, args)
    finally:
        matmul.allow_tf32 = saved
    assert torch.equal(not_tf32, fma)
    assert not torch.equal(tf32, fma)


@pytest.mark.skipif(not hasattr(torch.backends.cudnn, "conv"), reason="torch.backends.cudnn.conv.fp32_precision "
                    "(the new TF32 API) needs torch >= 2.8")
@pytest.mark.parametrize("stride", [1, 2])
def test_emulated_float32_gemm_follows_the_new_cudnn_conv_precision_api(stride):
    """torch.backends.cudnn.conv.fp32_precision alone (the API PyTorch recommends) leaves the
    RNN flag as it was: the kernel must ask for the conv flag, since asking cuDNN's flag
    without an op raises when the two differ (every float32 call then failed)."""
    args = make_inputs(1, 16, 16 if stride == 1 else 32, stride, 8 * stride, 8 * stride)
    fma = run_emulated(stride, args, tensor_cores=False)
    conv, rnn = torch.backends.cudnn.conv, torch.backends.cudnn.rnn
    saved = conv.fp32_precision, rnn.fp32_precision  # (monkeypatch cannot restore these properties)
    try:
        conv.fp32_precision, rnn.fp32_precision = "ieee", "tf32"
        assert torch.equal(run_emulated(stride, args), fma)
        conv.fp32_precision, rnn.fp32_precision = "tf32", "ieee"
        assert not torch.equal(run_emulated(stride, args), fma)
    finally:
        conv.fp32_precision, rnn.fp32_precision = saved


@pytest.mark.skipif(not hasattr(torch.backends.cudnn, "conv"), reason="torch.backends.cudnn.conv.fp32_precision "
                    "(the new TF32 API) needs torch >= 2.8")
@requires_triton
def test_triton_float32_dots_follow_cudnn_conv_tf32_as_the_cuda_kernel_does(monkeypatch):
    """The Triton GE and BGA-pointwise kernels pick TF32 by the CUDA kernel's rule (cuDNN's
    conv flag), also in the state the new API alone leaves, where the old
    torch.backends.cudnn.allow_tf32 getter raises because the conv and RNN flags differ."""
    from bisenet_fast.triton_kernels import bga_pointwise, ge_layer

    def precisions():
        return bf._C.cudnn_conv_allows_tf32(), ge_layer._fp32_dot_precision(), bga_pointwise.dot_precision(torch.float32)

    conv, rnn = torch.backends.cudnn.conv, torch.backends.cudnn.rnn
    saved = conv.fp32_precision, rnn.fp32_precision  # (monkeypatch cannot restore these properties)
    try:
        conv.fp32_precision, rnn.fp32_precision = "ieee", "tf32"
        assert precisions() == (False, "tf32x3", "ieee")
        conv.fp32_precision, rnn.fp32_precision = "tf32", "ieee"
        assert precisions() == (True, "tf32", "tf32")
    finally:
        conv.fp32_precision, rnn.fp32_precision = saved
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert precisions() == (False, "tf32x3", "ieee")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert precisions() == (True, "tf32", "tf32")
