"""bisenet_fast computes what mmsegmentation computes, number for number.

tests/data/mmseg_parity.npz holds mmseg 1.2.2's outputs (scripts/make_mmseg_parity_fixture.py,
tests/data/README.md) for weights and inputs that tests/parity_weights.py derives from fixed
seeds; here the same weights go into bf.BiSeNetV2Segmentor through load_mmseg_checkpoint and
every recorded tensor and loss must agree to 1e-4 (float32, CPU), under the eager reference
and under the default (fused) backend.
"""
import os

import numpy as np
import pytest
import torch

import bisenet_fast as bf
from tests.parity_weights import make_inputs, make_state_dict

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "mmseg_parity.npz")
ATOL = 1e-4
# Sums over whole tensors (final logits, BN running statistics) carry the float32 rounding
# of every element, so they get a relative bound.
SUM_RTOL = 1e-5
# Each parameter's gradient must also agree to this fraction of its own largest value.
REL_GRAD_TOL = 1e-4


BACKENDS = ["eager", "auto"]  # the reference, and the fused kernels (cpp on the CPU)


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURE) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def state(reference):
    keys = [str(k) for k in reference["state_keys"]]
    shapes = [list(s[:n]) for s, n in zip(reference["state_shapes"], reference["state_ndims"])]
    return make_state_dict(zip(keys, shapes))


def _segmentor(state, sampler=None, dropout_ratio=0.1):
    """bf's segmentor with the fixture's weights; sampler = (thresh, min_kept) or None."""
    options = {} if sampler is None else dict(ohem=True, ohem_thresh=sampler[0], ohem_min_kept=sampler[1])
    model = bf.BiSeNetV2Segmentor(num_classes=19, dropout_ratio=dropout_ratio, **options)
    bf.load_mmseg_checkpoint(model, state, strict=True)
    return model


def _samplers(reference):
    """[(name, None | (thresh, min_kept))] in the fixture's order."""
    settings = zip(reference["samplers"], reference["sampler_thresh"], reference["sampler_min_kept"])
    return [(str(name), None if np.isnan(thresh) else (float(thresh), int(min_kept))) for name, thresh, min_kept in settings]


def _assert_close(name, actual, expected, atol=ATOL):
    actual = actual.detach().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != mmseg's {expected.shape}"
    error = float(np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max())
    assert error <= atol, f"{name}: max abs error {error:.3g} > {atol:g} (mmseg absmax {np.abs(expected).max():.3g})"
    return error


def _inputs(reference, case):
    return make_inputs(tuple(int(n) for n in reference[f"{case}/input_shape"]))


CASES = ["batch2", "odd"]


def test_fixture_records_what_it_was_made_with(reference):
    versions = [str(v) for v in reference["versions"]]
    assert any(v.startswith("mmsegmentation=1.") for v in versions), versions
    assert len(reference["state_keys"]) == 385


def test_state_dict_matches_mmsegs_keys_and_shapes(reference, state):
    ours = _segmentor(state).state_dict()
    assert list(ours) == [str(k) for k in reference["state_keys"]]
    for key, value in ours.items():
        assert value.shape == state[key].shape, key


def test_weights_are_the_ones_mmseg_was_run_with(reference, state):
    """Guards against a change in torch's RNG streams, which would void every other check."""
    sums = np.array([float(v.double().sum()) for v in state.values()])
    np.testing.assert_allclose(sums, reference["state_sums"], rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_eval_backbone_heads_and_final_logits(reference, state, case, backend):
    model = _segmentor(state).eval()
    image, _ = _inputs(reference, case)
    with bf.backends.use(backend), torch.no_grad():
        feats = model.backbone(image)
        decode = model.decode_head(feats)
        aux = [head(feats) for head in model.auxiliary_head]
        final = model(image)
    for i, feat in enumerate(feats):
        _assert_close(f"backbone out[{i}]", feat, reference[f"{case}/backbone_{i}"])
    _assert_close("decode logits", decode, reference[f"{case}/decode_logits"])
    for i, logits in enumerate(aux):
        _assert_close(f"aux_{i} logits", logits, reference[f"{case}/aux_{i}_logits"])

    assert final.shape[-2:] == image.shape[-2:]
    stride = int(reference[f"{case}/final_logits_stride"])
    _assert_close("final logits (subsampled)", final[..., ::stride, ::stride], reference[f"{case}/final_logits_sub"])
    abs_sum = float(reference[f"{case}/final_logits_abs_sum"])
    assert abs(float(final.double().sum()) - float(reference[f"{case}/final_logits_sum"])) <= SUM_RTOL * abs_sum
    assert abs(float(final.double().abs().sum()) - abs_sum) <= SUM_RTOL * abs_sum


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_fused_inference_form_matches_mmseg(reference, state, case, backend):
    """model.fuse() (BN folded, fused GE and BGA kernels, channels_last) on the weights loaded
    through load_mmseg_checkpoint against mmseg's own outputs: every backbone output and the
    final logits to 1e-4 of the output's scale (issue 5's float32 bound)."""
    fused = _segmentor(state).eval().fuse()
    image, _ = _inputs(reference, case)
    with bf.backends.use(backend), torch.no_grad():
        feats = fused.backbone(image)
        final = fused(image)
    for i, feat in enumerate(feats):
        expected = reference[f"{case}/backbone_{i}"]
        _assert_close(f"fused backbone out[{i}]", feat, expected, atol=1e-4 * np.abs(expected).max())
    stride = int(reference[f"{case}/final_logits_stride"])
    expected = reference[f"{case}/final_logits_sub"]
    _assert_close("fused final logits (subsampled)", final[..., ::stride, ::stride], expected,
                  atol=1e-4 * np.abs(expected).max())
    abs_sum = float(reference[f"{case}/final_logits_abs_sum"])
    assert abs(float(final.double().abs().sum()) - abs_sum) <= 1e-4 * abs_sum


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_eval_losses_and_gradients_with_and_without_ohem(reference, state, case, backend):
    """Each head's loss (resize to label size, OHEM sampler, CE over all N*H*W pixels) in
    eval mode (BN running statistics, no dropout, so deterministic), and the gradients of
    their sum for parameters spread over the network, so the fused ops' backward is
    checked too. Each parameter's gradient must also agree to 1e-4 of its own largest
    value (the first conv's is ~1e-3 in size, where the absolute bound alone says little)."""
    image, labels = _inputs(reference, case)
    keys = [str(k) for k in reference["loss_keys"]]
    grad_keys = [str(k) for k in reference["grad_keys"]]
    for row, (name, sampler) in enumerate(_samplers(reference)):
        model = _segmentor(state, sampler).eval()
        with bf.backends.use(backend):
            losses = model.loss(image, labels)
            assert list(losses) == keys
            expected = reference[f"{case}/eval_losses"][row]
            _assert_close(f"{name} losses", torch.stack([losses[k] for k in keys]), expected)
            sum(losses.values()).backward()
        params = dict(model.named_parameters())
        expected = reference[f"{case}/eval_grads"][row]
        offset = 0
        for key in grad_keys:
            grad = params[key].grad.flatten()
            want = expected[offset : offset + grad.numel()]
            offset += grad.numel()
            _assert_close(f"{name} d(loss)/d({key})", grad, want, atol=min(ATOL, REL_GRAD_TOL * np.abs(want).max()))
        assert offset == expected.size


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_losses_and_running_stats(reference, state, backend):
    """Train mode (BN batch statistics) with dropout 0, as mmseg's model.loss in training:
    the five losses with and without OHEM, and the BN running statistics after the forward."""
    case = "batch2"
    image, labels = _inputs(reference, case)
    keys = [str(k) for k in reference["loss_keys"]]
    for row, (name, sampler) in enumerate(_samplers(reference)):
        model = _segmentor(state, sampler, dropout_ratio=0.0).train()
        with bf.backends.use(backend), torch.no_grad():
            losses = model.loss(image, labels)
        expected = reference[f"{case}/train_losses"][row]
        _assert_close(f"{name} train losses", torch.stack([losses[k] for k in keys]), expected)
        if sampler is None:
            after = model.state_dict()
            for stat in ("running_mean", "running_var"):
                sums = np.array([float(v.double().sum()) for k, v in after.items() if k.endswith(stat)])
                expected = reference[f"{case}/train_{stat}_sums"]
                np.testing.assert_allclose(sums, expected, rtol=SUM_RTOL, atol=ATOL, err_msg=stat)
