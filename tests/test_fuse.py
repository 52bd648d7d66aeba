"""model.fuse(): the inference form (BN folded, fused GE op, channels_last, fp16/bf16) must
match the unfused model. BN statistics and affines are randomised first, so a wrong fold
cannot hide behind identity BNs."""
import pytest
import torch
from torch import nn

import bisenet_fast as bf
from bisenet_fast.models.bisenetv2 import GELayer
from bisenet_fast.models.autotune import autotune_choices
from bisenet_fast.models.fused import (
    FusedBiSeNetV2, FusedBiSeNetV2Segmentor, FusedGELayer, bn_scale_shift, capture_cuda_graph,
)
from bisenet_fast.ops.ge_layer import GPU_PREFERENCE as GE_GPU_PREFERENCE
from tests.helpers import requires_cuda, requires_cuda_build, requires_triton, triton_device


def randomise_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
            module.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
            module.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            module.bias.data.copy_(torch.rand(c, generator=gen) * 0.6 - 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def segmentor():
    torch.manual_seed(0)
    return randomise_batchnorms(bf.BiSeNetV2Segmentor(num_classes=19))


@pytest.fixture(scope="module")
def image():
    return torch.randn(2, 3, 70, 98, generator=torch.Generator().manual_seed(1))


def unfused_logits(model, x):
    with torch.no_grad(), bf.backends.use("eager"):
        return model(x)


def assert_matches(actual, expected, rel):
    assert actual.shape == expected.shape
    scale = expected.abs().max()
    err = (actual.float() - expected).abs().max()
    assert err <= rel * scale, f"max error {err:.3g} > {rel} x output scale {scale:.3g}"


def test_bn_scale_shift_is_eval_batchnorm():
    """In float64, with a running variance near eps so that dropping eps would show."""
    gen = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm2d(6, eps=0.25).double().eval()
    bn.running_mean.copy_(torch.rand(6, generator=gen, dtype=torch.float64) - 0.5)
    bn.running_var.copy_(torch.rand(6, generator=gen, dtype=torch.float64) * 1e-2)
    bn.weight.data.copy_(torch.rand(6, generator=gen, dtype=torch.float64) + 0.5)
    bn.bias.data.copy_(torch.rand(6, generator=gen, dtype=torch.float64) - 0.5)
    x = torch.randn(2, 6, 3, 4, generator=gen, dtype=torch.float64)
    scale, shift = bn_scale_shift(bn)
    torch.testing.assert_close(x * scale[:, None, None] + shift[:, None, None], bn(x))


def test_fold_alone_matches_in_float32(segmentor, image):
    # The eager backend runs each op's reference: this isolates the folding.
    fused = segmentor.fuse()
    with torch.no_grad(), bf.backends.use("eager"):
        out = fused(image)
    assert_matches(out, unfused_logits(segmentor, image), 1e-4)


def test_fused_kernels_match_in_float32(segmentor, image):
    fused = segmentor.fuse()
    assert isinstance(fused, FusedBiSeNetV2Segmentor)
    with torch.no_grad():
        out = fused(image)
    assert out.dtype == torch.float32
    assert_matches(out, unfused_logits(segmentor, image), 1e-4)


def test_backbone_fuse_matches_every_output(segmentor, image):
    fused = segmentor.backbone.fuse()
    assert isinstance(fused, FusedBiSeNetV2)
    with torch.no_grad():
        outs = fused(image)
    with torch.no_grad(), bf.backends.use("eager"):
        expected = segmentor.backbone(image)
    assert len(outs) == len(expected) == 5
    for out, ref in zip(outs, expected):
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert_matches(out, ref, 1e-4)


@pytest.mark.parametrize("dtype,rel", [(torch.float16, 3e-2), (torch.bfloat16, 1e-1)])
def test_low_precision(segmentor, image, dtype, rel):
    fused = segmentor.fuse(dtype=dtype)
    assert all(b.dtype == dtype for b in fused.buffers())
    with torch.no_grad():
        out = fused(image[:1])
    assert out.dtype == dtype
    assert_matches(out, unfused_logits(segmentor, image[:1]), rel)


def test_no_batchnorm_left_ceblock_gap_included(segmentor):
    fused = segmentor.fuse()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())


def test_compiles_as_one_graph(segmentor, image):
    """Every fused op has a fake kernel, so torch.compile takes the whole inference form in
    one graph (a graph break would leave the GPU launches between the pieces uncompiled)."""
    fused = segmentor.fuse()
    with torch.no_grad():
        expected = fused(image)
        compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)(image)
    assert_matches(compiled, expected, 1e-6)


def test_compiles_once_for_every_input_size(segmentor, image):
    """With dynamic shapes the fused model is one graph for any input size (torch.export with
    dynamic H, W likewise): no op fixes a size."""
    torch._dynamo.reset()
    fused = segmentor.fuse()
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        # Sizes 64 apart: some torch releases (2.11) guard max_pool2d on the parity of the
        # halved size, which then stays the same at every stride of the network.
        for x in (image, torch.randn(2, 3, 134, 162, generator=torch.Generator().manual_seed(2))):
            assert_matches(compiled(x), fused(x), 1e-6)


@pytest.mark.parametrize("form", ["fused", "unfused"])
def test_exports_with_dynamic_height_and_width(segmentor, image, form):
    """As the README says: torch.export with dynamic height and width (33 or more: below that
    the 1/32-resolution maps have size 1, which torch specialises) gives a program that runs
    at another height and width, fused or not."""
    model = segmentor.fuse() if form == "fused" else segmentor
    height, width = torch.export.Dim("height", min=33), torch.export.Dim("width", min=33)
    with torch.no_grad():
        program = torch.export.export(model, (image,), dynamic_shapes=({2: height, 3: width},))
        for x in (image, torch.randn(2, 3, 33, 161, generator=torch.Generator().manual_seed(3))):
            assert_matches(program.module()(x), model(x), 1e-6)


def test_autocast_around_the_fused_model_has_no_effect(segmentor, image):
    """The fused model computes in the dtype it was fused to; an enclosing autocast (which
    would cast ATen's conv outputs but not the fused ops' weights) is switched off inside."""
    fused = segmentor.fuse()
    with torch.no_grad():
        expected = fused(image)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fused(image)
            backbone_outs = fused.backbone(image)
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    assert all(t.dtype == torch.float32 for t in backbone_outs)


def test_fuse_leaves_the_model_untouched(segmentor, image):
    before = {k: v.clone() for k, v in segmentor.state_dict().items()}
    segmentor.fuse(dtype=torch.float16)
    after = segmentor.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert segmentor.training is False


def test_inference_only(segmentor, image):
    fused = segmentor.fuse()
    with pytest.raises(RuntimeError, match="inference form"):
        fused.train()
    fused.eval()  # eval stays allowed
    with pytest.raises(RuntimeError, match="inference-only"):
        fused(image.clone().requires_grad_(True))


def test_bad_input_is_refused_naming_it(segmentor, image):
    """An integer image (raw pixels, not normalised) would give meaningless logits; a 3-D one
    failed inside the channels_last conversion. Floating images of any dtype are cast."""
    fused = segmentor.fuse()
    with torch.no_grad():
        with pytest.raises(TypeError, match=r"x must have dtype in \(float32, .*\), got uint8"):
            fused(image.to(torch.uint8))
        with pytest.raises(ValueError, match=r"x must be 4-D, got shape \(3, "):
            fused(image[0])
        torch.testing.assert_close(fused(image.double()), fused(image))


def test_empty_or_non_tensor_input_is_refused_at_the_model(segmentor):
    """An empty batch failed deep inside (an inner op's 'x must be non-empty, got shape
    (0, 64, 32, 32)', not the caller's shape), and a non-tensor failed on `.device`
    (AttributeError) before the input check ran: both are named at the model's input."""
    fused = segmentor.fuse()
    with torch.no_grad():
        for model in (fused, fused.backbone):
            with pytest.raises(ValueError, match=r"x must be non-empty, got shape \(0, 3, 64, 64\)"):
                model(torch.empty(0, 3, 64, 64))
            with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got ndarray"):
                model(torch.zeros(1, 3, 64, 64).numpy())


def test_bad_dtype(segmentor):
    with pytest.raises(ValueError, match="fuse\\(dtype=...\\) must be one of"):
        segmentor.fuse(dtype=torch.float64)


def test_a_cast_after_fuse_is_fusing_to_that_dtype(segmentor, image):
    """.half() on a fused model computes as fuse(dtype=torch.float16) does (both cast the
    float32 fold); a dtype the fused model cannot run in is refused when called, by name."""
    half = segmentor.fuse().half()
    assert half.dtype == half.backbone.dtype == torch.float16
    with torch.no_grad():
        assert torch.equal(half(image[:1]), segmentor.fuse(dtype=torch.float16)(image[:1]))
    double = segmentor.fuse().double()
    with torch.no_grad(), pytest.raises(TypeError, match="holds torch.float64 weights"):
        double(image[:1])


@requires_triton
@pytest.mark.parametrize("cin,cout,stride", [(16, 16, 1), (16, 32, 2)])
def test_fused_ge_layer_triton_uses_its_packed_weights(cin, cout, stride):
    """FusedGELayer packs its weights for the Triton kernels once; the packed copies follow
    a dtype cast and a loaded state_dict, and give the unfused layer's output."""
    torch.manual_seed(0)
    layer = randomise_batchnorms(GELayer(cin, cout, 6, stride)).to(triton_device())
    x = torch.randn(1, cin, 9, 11, device=triton_device()).relu()
    fused = FusedGELayer(layer)
    assert not any(name.startswith("triton_packed") for name in fused.state_dict())
    with torch.no_grad():
        expected = layer(x)
        with bf.backends.use("triton"):
            assert_matches(fused(x.contiguous(memory_format=torch.channels_last)), expected, 1e-4)
            half = FusedGELayer(layer).half()
            assert all(t.dtype == torch.float16 for t in half.triton_weights())
            assert_matches(half(x.half().contiguous(memory_format=torch.channels_last)), expected, 1e-2)
            other = randomise_batchnorms(GELayer(cin, cout, 6, stride), seed=1).to(triton_device())
            reloaded = FusedGELayer(other)
            reloaded.load_state_dict(fused.state_dict())
            assert_matches(reloaded(x.contiguous(memory_format=torch.channels_last)), expected, 1e-4)


def test_capture_cuda_graph_needs_cuda(segmentor):
    with pytest.raises(ValueError, match="CUDA example input"):
        capture_cuda_graph(segmentor.fuse(), torch.zeros(1, 3, 64, 64))


@requires_cuda
@pytest.mark.parametrize("autotune", [False, True])
@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-4), (torch.float16, 3e-2)])
def test_gpu_fused_and_cuda_graph(segmentor, dtype, rel, autotune, monkeypatch):
    # The float32 bar is 1e-4: keep cuDNN's convs (both models) off TF32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = bf.BiSeNetV2Segmentor(num_classes=19)
    model.load_state_dict(segmentor.state_dict())
    model = model.cuda().eval()
    x = torch.randn(1, 3, 128, 192, device="cuda")
    expected = unfused_logits(model, x)
    fused = model.fuse(dtype=dtype, autotune=autotune)
    with torch.no_grad():
        out = fused(x)
    assert_matches(out, expected, rel)
    if autotune:  # every GE layer timed all its GPU candidates
        candidates = {f"fused-{b}" for b in bf.backends.fused_backends(x.device, GE_GPU_PREFERENCE)}
        for entries in autotune_choices(fused).values():
            assert set(entries[0]["ms"]) == candidates | {"aten", "aten-nchw"}
    run = capture_cuda_graph(fused, x)
    x2 = torch.randn_like(x)
    assert_matches(run(x2), unfused_logits(model, x2), rel)


@requires_cuda_build
@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-4), (torch.float16, 3e-2)])
def test_gpu_fused_with_cuda_ge_layers(segmentor, dtype, rel, monkeypatch):
    """The fused model with its GE layers on the CUDA kernels (not the default GPU backend
    yet), eagerly and replayed as a CUDA graph (the split-K layers allocate their
    workspace inside the capture)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = bf.BiSeNetV2Segmentor(num_classes=19)
    model.load_state_dict(segmentor.state_dict())
    model = model.cuda().eval()
    x = torch.randn(1, 3, 256, 320, device="cuda")
    fused = model.fuse(dtype=dtype)
    with bf.backends.use("cuda", ops=["ge_layer_stride1", "ge_layer_stride2"]):
        with torch.no_grad():
            assert_matches(fused(x), unfused_logits(model, x), rel)
        run = capture_cuda_graph(fused, x)
    x2 = torch.randn_like(x)
    assert_matches(run(x2), unfused_logits(model, x2), rel)
