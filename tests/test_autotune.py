"""model.fuse(autotune=True): each GE layer times its candidates (the fused op on each fused
backend, the folded convs through ATen in channels_last and in NCHW) on the first call per
input signature and runs the fastest. Every candidate must give the layer's output; the
choice must be made once per signature, never inside a compiled graph or a CUDA graph
capture, and never when a backend is forced."""
import copy

import pytest
import torch

import bisenet_fast as bf
from bisenet_fast.models.autotune import LayerAutotuner, autotune_choices, signature
from bisenet_fast.models.bisenetv2 import GELayer
from bisenet_fast.models.fused import FusedGELayer
from bisenet_fast.ops.ge_layer import GPU_PREFERENCE
from tests.helpers import requires_cuda
from tests.test_fuse import assert_matches, randomise_batchnorms, unfused_logits
from tests.test_ge_layer import NETWORK_CONFIGS

GE_OPS = ["ge_layer_stride1", "ge_layer_stride2"]


class FakeTimer:
    """Times the candidates, which come in `order`, as `ms[name]` (calling each once, as the
    real timer does), and lists what it timed."""

    def __init__(self, ms, order):
        self.ms, self.order, self.calls = ms, order, []

    def __call__(self, fn, device):
        fn()
        name = self.order[len(self.calls) % len(self.order)]
        self.calls.append(name)
        return self.ms[name]


def fake_timed(layer: FusedGELayer, ms: dict) -> FakeTimer:
    timer = FakeTimer(ms, layer.candidates(torch.device("cpu")))
    layer.autotuner = LayerAutotuner(layer.candidates, layer.run, timer)
    return timer


def ge_layer(cin, cout, stride, seed=0):
    torch.manual_seed(seed)
    return randomise_batchnorms(GELayer(cin, cout, 6, stride), seed)


@pytest.fixture(scope="module")
def segmentor():
    torch.manual_seed(0)
    return randomise_batchnorms(bf.BiSeNetV2Segmentor(num_classes=19))


@pytest.mark.parametrize("cin,cout,stride", NETWORK_CONFIGS)
@pytest.mark.parametrize("layout", ["channels_last", "NCHW", "strided"])
def test_every_candidate_gives_the_layer_output(cin, cout, stride, layout):
    layer = ge_layer(cin, cout, stride)
    fused = FusedGELayer(layer, autotune=True)
    x = torch.randn(2, cin, 9, 22).relu()[..., ::2]  # odd sizes: stride 2 rounds up
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "NCHW":
        x = x.contiguous()
    with torch.no_grad():
        expected = layer(x)
        candidates = fused.candidates(x.device)
        assert candidates == ["fused-cpp", "aten", "aten-nchw"]
        for name in candidates:
            out = fused.run(name, x)
            assert out.is_contiguous(memory_format=torch.channels_last), name
            assert_matches(out, expected, 1e-5)


def test_layout_candidates_run_their_layout(monkeypatch):
    """ATen runs a conv channels_last if either operand is: the NCHW candidate must pass
    conv1's weight NCHW too, or it is the channels_last candidate again."""
    fused = FusedGELayer(ge_layer(16, 16, 1))
    layouts = []
    aten = fused._aten
    monkeypatch.setattr(fused, "_aten", lambda x, y: layouts.append((x.is_contiguous(), y.is_contiguous())) or aten(x, y))
    x = torch.randn(1, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fused.run("aten", x)
        fused.run("aten-nchw", x)
    assert layouts == [(False, False), (True, True)]


def test_autotuned_model_matches_and_tunes_every_ge_layer(segmentor):
    fused = segmentor.fuse(autotune=True)
    x = torch.randn(1, 3, 70, 98)
    with torch.no_grad():
        out = fused(x)
    assert_matches(out, unfused_logits(segmentor, x), 1e-4)
    report = autotune_choices(fused)
    assert len(report) == 8  # the GE layers: two in stage2, two in stage3, four in stage4
    for entries in report.values():
        (entry,) = entries
        assert entry["dtype"] == "float32" and entry["device"] == "cpu" and entry["channels_last"]
        assert set(entry["ms"]) == {"fused-cpp", "aten", "aten-nchw"}
        assert entry["choice"] == min(entry["ms"], key=entry["ms"].get)
    assert autotune_choices(segmentor.fuse()) == {}  # off by default


def test_the_fastest_candidate_runs_and_each_signature_is_tuned_once():
    layer = ge_layer(16, 32, 2)
    fused = FusedGELayer(layer, autotune=True)
    timer = fake_timed(fused, {"fused-cpp": 3.0, "aten": 2.0, "aten-nchw": 1.0})
    x = torch.randn(1, 16, 12, 14).contiguous(memory_format=torch.channels_last)
    ran = []
    run = fused.run
    fused.autotuner.run = lambda name, t: ran.append(name) or run(name, t)
    with torch.no_grad():
        for _ in range(3):
            assert_matches(fused(x), layer(x), 1e-5)
    assert timer.calls == ["fused-cpp", "aten", "aten-nchw"]  # timed once each, on the first call
    assert ran[-2:] == ["aten-nchw", "aten-nchw"]
    assert fused.autotuner.choices[signature(x)].name == "aten-nchw"
    # Another size, dtype or layout is another signature.
    with torch.no_grad():
        fused(torch.randn(1, 16, 10, 10).contiguous(memory_format=torch.channels_last))
        fused(x.contiguous())
        fused.double()(x.double())
    assert len(fused.autotuner.choices) == 4
    assert len(timer.calls) == 12


@pytest.mark.parametrize("forced", [{"name": "eager"}, {"name": "cpp", "ops": GE_OPS}])
def test_a_forced_backend_bypasses_the_autotuner(forced):
    layer = ge_layer(32, 32, 1)
    fused = FusedGELayer(layer, autotune=True)
    timer = fake_timed(fused, {"fused-cpp": 3.0, "aten": 2.0, "aten-nchw": 1.0})
    x = torch.randn(1, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), bf.backends.use(**forced):
        assert_matches(fused(x), layer(x), 1e-5)
    assert timer.calls == [] and fused.autotuner.choices == {}


def test_compiled_model_runs_the_tuned_choice_and_never_tunes():
    layer = ge_layer(32, 64, 2)
    fused = FusedGELayer(layer, autotune=True)
    timer = fake_timed(fused, {"fused-cpp": 3.0, "aten": 1.0, "aten-nchw": 2.0})
    tuned = torch.randn(1, 32, 12, 12).contiguous(memory_format=torch.channels_last)
    untuned = torch.randn(1, 32, 10, 10).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fused(tuned)
        ran = []
        run = fused.run
        fused.autotuner.run = lambda name, t: ran.append(name) or run(name, t)
        compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
        assert_matches(compiled(tuned), layer(tuned), 1e-5)
        assert ran == ["aten"]  # traced through the tuned choice
        assert_matches(compiled(untuned), layer(untuned), 1e-5)
        assert ran == ["aten", "fused-cpp"]  # untuned: the default, not tuned while tracing
    assert len(timer.calls) == 3 and list(fused.autotuner.choices) == [signature(tuned)]


def test_tuned_model_survives_save_load_and_deepcopy(segmentor, tmp_path):
    """torch.save of the whole module (not only its state_dict) keeps the choices, and the
    copies' autotuners run the copies' own weights."""
    fused = segmentor.fuse(autotune=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = fused(x)
    torch.save(fused, tmp_path / "fused.pt")
    for copy_ in (torch.load(tmp_path / "fused.pt", weights_only=False), copy.deepcopy(fused)):
        assert autotune_choices(copy_) == autotune_choices(fused)
        layer = copy_.backbone.semantic.stage2[0]
        assert layer.autotuner.run.__self__ is layer
        with torch.no_grad():
            assert torch.equal(copy_(x), expected)


def test_bad_arguments(segmentor):
    with pytest.raises(TypeError, match=r"fuse\(autotune=...\) must be True or False, got 'yes'"):
        segmentor.fuse(autotune="yes")
    fused = FusedGELayer(ge_layer(16, 16, 1))
    with pytest.raises(ValueError, match="unknown candidate 'cudnn'; expected one of"):
        fused.run("cudnn", torch.randn(1, 16, 4, 4))
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        bf.ops.ge_layer_stride1(*[torch.randn(1, 16, 4, 4)] * 2, *fused.weights(), backend="cudnn")


@requires_cuda
def test_gpu_cuda_graph_capture_of_an_untuned_size_raises(segmentor):
    fused = FusedGELayer(ge_layer(16, 16, 1), autotune=True).cuda()
    x = torch.randn(1, 16, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="never run before this CUDA graph capture"):
        with torch.inference_mode(), torch.cuda.graph(graph):
            fused(x)


def test_candidates_follow_the_gpu_preference(monkeypatch):
    """On a GPU the fused candidates are the op's available GPU backends, default first."""
    fused = FusedGELayer(ge_layer(16, 16, 1))
    for available in ("cuda", "triton"):
        monkeypatch.setattr(bf.backends, "_build_problem", lambda name: None if name == available else "absent")
        assert fused.candidates(torch.device("cuda")) == [f"fused-{available}", "aten", "aten-nchw"]
    monkeypatch.setattr(bf.backends, "_build_problem", lambda name: None)
    assert fused.candidates(torch.device("cuda")) == [f"fused-{b}" for b in GPU_PREFERENCE] + ["aten", "aten-nchw"]
