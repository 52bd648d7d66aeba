"""The recomputing detail branch (conv outputs kept, ReLU outputs rebuilt in backward) against
the eager DetailBranch: outputs, every gradient, running statistics over several steps,
layouts, odd sizes, autocast, float64 gradcheck, the activations it keeps, the paths where it
must not apply, bad modules, and the switch on the whole segmentor and the training CLI."""
import copy

import pytest
import torch
from torch import nn

import bisenet_fast as bf
from benchmarks.timing import saved_activation_mb
from bisenet_fast.models import use_recomputing_detail_branch
from bisenet_fast.models.bisenetv2 import DetailBranch
from bisenet_fast.models.fused import FusedDetailBranch
from bisenet_fast.models.recompute_detail import RecomputingDetailBranch, _ConvBNReLUChain, conv_bn_relu_chain
from tests.helpers import assert_close_to_scale, requires_cuda


def make_branch(channels=(8, 8, 16), momentum=0.1, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    branch = DetailBranch(channels).train()
    for m in branch.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0.0, 0.3)
    return branch.to(dtype)


def step(branch, x, grad_seed=1, autocast_dtype=None):
    """One forward/backward; (output, grad of x, grads of the parameters by name)."""
    branch.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = branch(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    out.backward(g.to(device=out.device, dtype=out.dtype))
    return out.detach(), x.grad, {_plain(name): p.grad for name, p in branch.named_parameters()}


def _plain(name):
    """A parameter or buffer name without torch.compile's wrapper prefix."""
    return name.removeprefix("_orig_mod.")


def assert_same_steps(eager, fused, inputs, rel, autocast_dtype=None, buffer_rel=1e-6):
    for i, x in enumerate(inputs):
        out_e, gx_e, gp_e = step(eager, x, grad_seed=i, autocast_dtype=autocast_dtype)
        out_f, gx_f, gp_f = step(fused, x, grad_seed=i, autocast_dtype=autocast_dtype)
        assert out_f.dtype == out_e.dtype
        assert out_f.is_contiguous(memory_format=torch.channels_last) == out_e.is_contiguous(
            memory_format=torch.channels_last)
        assert_close_to_scale(out_f, out_e, rel, f"step {i} output")
        assert_close_to_scale(gx_f, gx_e, rel, f"step {i} grad of x")
        assert gp_f.keys() == gp_e.keys()
        for name in gp_e:
            assert_close_to_scale(gp_f[name], gp_e[name], rel, f"step {i} grad of {name}")
    buffers_e = dict(eager.named_buffers())
    buffers_f = {_plain(name): value for name, value in fused.named_buffers()}
    assert buffers_f.keys() == buffers_e.keys()
    for name, value in buffers_e.items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(buffers_f[name], value), name
        else:
            assert_close_to_scale(buffers_f[name], value, buffer_rel, name)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "non_contiguous"])
@pytest.mark.parametrize("n, height, width", [(1, 33, 47), (3, 24, 40)])
def test_matches_eager_detail_branch(layout, n, height, width):
    eager = make_branch()
    fused = RecomputingDetailBranch(copy.deepcopy(eager))
    inputs = []
    for seed in range(2):  # two steps: running statistics move twice
        x = torch.randn(n, 3, height, width * (2 if layout == "non_contiguous" else 1),
                        generator=torch.Generator().manual_seed(seed))
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        elif layout == "non_contiguous":
            x = x[..., ::2]
        inputs.append(x)
    assert_same_steps(eager, fused, inputs, rel=2e-5)


def test_cumulative_average_running_statistics():
    eager = make_branch(momentum=None)
    fused = RecomputingDetailBranch(copy.deepcopy(eager))
    inputs = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    assert_same_steps(eager, fused, inputs, rel=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_matches_eager(dtype):
    eager = make_branch()
    fused = RecomputingDetailBranch(copy.deepcopy(eager))
    x = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    out, _, _ = step(copy.deepcopy(fused), x, autocast_dtype=dtype)
    assert out.dtype == dtype
    assert_same_steps(eager, fused, [x], rel=3e-2, autocast_dtype=dtype, buffer_rel=1e-2)


@requires_cuda
def test_cuda_matches_eager():
    """On a GPU eager BatchNorm runs cuDNN's kernels and the chain ATen's native ones."""
    eager = make_branch().cuda()
    fused = RecomputingDetailBranch(copy.deepcopy(eager))
    inputs = [torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(s)).cuda() for s in range(2)]
    assert_same_steps(eager, fused, inputs, rel=1e-4, buffer_rel=1e-5)


def scaled_error(actual, exact):
    return ((actual.double() - exact).abs().max() / exact.abs().max().clamp_min(1e-12)).item()


@requires_cuda
def test_cuda_float16_as_accurate_as_eager():
    """Under float16 autocast the branch's eight conv/BN layers lose 10-20 % of a gradient's
    scale against float64 whatever the kernels (measured on the CPU, where the chain and eager
    agree bit for bit). On a GPU eager runs cuDNN's BatchNorm and the chain ATen's, so they
    differ from each other by as much: each is held to float64 instead, the chain at most
    a little worse than eager (rounding differs between the two sets of kernels)."""
    eager = make_branch().cuda()
    fused = RecomputingDetailBranch(copy.deepcopy(eager))
    exact = copy.deepcopy(eager).double()
    for seed in range(2):
        x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(seed)).cuda()
        out_x, gx_x, gp_x = step(exact, x.double(), grad_seed=seed)
        out_e, gx_e, gp_e = step(eager, x, grad_seed=seed, autocast_dtype=torch.float16)
        out_f, gx_f, gp_f = step(fused, x, grad_seed=seed, autocast_dtype=torch.float16)
        assert out_f.dtype == out_e.dtype == torch.float16
        pairs = {"output": (out_f, out_e, out_x), "grad of x": (gx_f, gx_e, gx_x)}
        pairs.update({f"grad of {name}": (gp_f[name], gp_e[name], gp_x[name]) for name in gp_x})
        for what, (fused_value, eager_value, exact_value) in pairs.items():
            err_f, err_e = scaled_error(fused_value, exact_value), scaled_error(eager_value, exact_value)
            assert err_f <= 1.5 * err_e + 2e-2, f"step {seed} {what}: chain {err_f:.3g}, eager {err_e:.3g} of the scale"
    buffers_f = dict(fused.named_buffers())
    for name, value in eager.named_buffers():
        assert_close_to_scale(buffers_f[name], value, 3e-2, name)


def test_gradcheck_float64():
    branch = make_branch(channels=(3, 3, 4), dtype=torch.float64)
    layers = tuple(layer for stage in branch.detail_branch for layer in stage)
    x = torch.randn(2, 3, 17, 19, dtype=torch.float64, requires_grad=True)
    # The op computes with the parameters it is given (the modules supply geometry and the
    # BN buffers), so gradcheck can perturb detached copies.
    params = [p.detach().clone().requires_grad_() for layer in layers
              for p in (layer.conv.weight, layer.bn.weight, layer.bn.bias)]
    assert torch.autograd.gradcheck(lambda x, *params: _ConvBNReLUChain.apply(x, layers, torch.float64, *params),
                                    (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_compiles_with_torch_compile():
    eager = make_branch()
    compiled = torch.compile(RecomputingDetailBranch(copy.deepcopy(eager)))
    x = torch.randn(2, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    assert_same_steps(eager, compiled, [x], rel=2e-5)


def test_keeps_only_the_conv_outputs():
    """Eager saves each ConvModule's conv output (for BN) and ReLU output (for the ReLU and the
    next conv), plus BN's batch statistics; the chain saves the conv outputs and statistics."""
    eager = make_branch()
    fused = RecomputingDetailBranch(copy.deepcopy(eager))
    x = torch.randn(2, 3, 64, 64)
    conv_outputs_mb = 0.0
    y = x
    with torch.no_grad():
        for stage in eager.detail_branch:
            for layer in stage:
                y = layer(y)
                conv_outputs_mb += y.numel() * y.element_size() / 2**20  # same shape as the conv output
    stats_mb = sum(2 * layer.bn.num_features * 4 for stage in eager.detail_branch for layer in stage) / 2**20
    eager_mb = saved_activation_mb(lambda: eager(x), exclude=[*eager.parameters(), *eager.buffers(), x])
    fused_mb = saved_activation_mb(lambda: fused(x), exclude=[*fused.parameters(), *fused.buffers(), x])
    assert eager_mb == pytest.approx(2 * conv_outputs_mb + stats_mb)
    assert fused_mb == pytest.approx(conv_outputs_mb + stats_mb)


def test_eval_mode_no_grad_and_frozen_bn_run_the_stages():
    eager = make_branch()
    fused = RecomputingDetailBranch(copy.deepcopy(eager))
    x = torch.randn(2, 3, 32, 32)
    eager.eval(), fused.eval()
    torch.testing.assert_close(fused(x), eager(x), rtol=0, atol=0)
    eager.train(), fused.train()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), eager(x), rtol=0, atol=0)
    # One frozen BatchNorm (statistics in eval mode): the plain stages, so the frozen BN is honoured.
    eager.detail_branch[1][0].bn.eval()
    fused.detail_branch[1][0].bn.eval()
    assert_same_steps(eager, fused, [x], rel=0)


def test_too_few_values_per_channel_is_the_eager_error():
    eager = make_branch()
    fused = RecomputingDetailBranch(copy.deepcopy(eager))
    x = torch.randn(1, 3, 8, 8)  # 1x1 after the third stride-2 conv
    for branch in (eager, fused):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
            branch(x)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda m: setattr(m, "bn", nn.SyncBatchNorm(m.bn.num_features)), "affine nn.BatchNorm2d"),
        (lambda m: setattr(m, "bn", nn.BatchNorm2d(m.bn.num_features, affine=False)), "affine nn.BatchNorm2d"),
        (lambda m: setattr(m, "activate", None), r"conv \(no bias, zero padding\) -> BN -> ReLU"),
        (lambda m: setattr(m.conv, "bias", nn.Parameter(torch.zeros(m.conv.out_channels))),
         r"conv \(no bias, zero padding\) -> BN -> ReLU"),
    ],
)
def test_rejects_modules_it_cannot_recompute(change, match):
    branch = make_branch()
    change(branch.detail_branch[1][1])
    with pytest.raises(ValueError, match=match):
        RecomputingDetailBranch(branch)


def test_rejects_a_non_conv_module():
    with pytest.raises(ValueError, match="expected ConvModules, got ReLU"):
        conv_bn_relu_chain(torch.randn(2, 3, 8, 8), (nn.ReLU(),))


def test_segmentor_switch_same_losses_grads_and_state_dict_keys():
    torch.manual_seed(0)
    eager = bf.BiSeNetV2Segmentor(num_classes=5).train()
    fused = use_recomputing_detail_branch(copy.deepcopy(eager))
    assert isinstance(fused.backbone.detail, RecomputingDetailBranch)
    assert list(fused.state_dict()) == list(eager.state_dict())
    x = torch.randn(2, 3, 64, 64)
    y = torch.randint(0, 5, (2, 64, 64))
    results = []
    for model in (eager, fused):
        torch.manual_seed(1)  # the heads' dropout
        with bf.backends.use("eager"):
            losses = model.loss(x, y)
        sum(losses.values()).backward()
        results.append((losses, {n: p.grad for n, p in model.named_parameters()}))
    (losses_e, grads_e), (losses_f, grads_f) = results
    for key in losses_e:
        torch.testing.assert_close(losses_f[key], losses_e[key], rtol=1e-5, atol=1e-6)
    for name, grad in grads_e.items():
        assert_close_to_scale(grads_f[name], grad, 1e-4, name)
    fused.eval()
    assert isinstance(fused.fuse().backbone.detail, FusedDetailBranch)  # the inference form still builds
