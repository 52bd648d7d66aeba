"""load_mmseg_checkpoint: every accepted form, clear mismatch errors, no code execution."""
import os
import pickle

import pytest
import torch

import bisenet_fast as bf
from bisenet_fast.checkpoint import CheckpointMismatchError


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    model = bf.BiSeNetV2Segmentor()
    for m in model.modules():  # non-trivial BN buffers so that a missed buffer shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(7)
    return model


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _mmcv_checkpoint(model):
    """The layout mmcv's save_checkpoint writes (spec §4)."""
    return {
        "meta": {
            "mmcv_version": "1.3.13",
            "time": "Thu Sep  2 01:55:51 2021",
            "CLASSES": ("road", "sidewalk"),
            "PALETTE": [[128, 64, 128], [244, 35, 232]],
            "epoch": 0,
            "iter": 160000,
        },
        "state_dict": model.state_dict(),
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "momentum": 0.9, "params": [0, 1]}]},
    }


@pytest.mark.parametrize("form", ["mmcv_file", "mmcv_dict", "bare_state_dict", "module_prefixed_file"])
def test_loads_every_accepted_form(source, tmp_path, form):
    target = bf.BiSeNetV2Segmentor()
    if form == "mmcv_file":
        path = tmp_path / "ckpt.pth"
        torch.save(_mmcv_checkpoint(source), path)
        report = bf.load_mmseg_checkpoint(target, path)
    elif form == "mmcv_dict":
        report = bf.load_mmseg_checkpoint(target, _mmcv_checkpoint(source))
    elif form == "bare_state_dict":
        report = bf.load_mmseg_checkpoint(target, source.state_dict())
    else:
        path = tmp_path / "ddp.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
        report = bf.load_mmseg_checkpoint(target, str(path))
    assert report == {"missing": [], "unexpected": [], "shape_mismatch": []}
    _assert_same(target, source)


def test_backbone_only_loading_from_full_checkpoint(source):
    backbone = bf.BiSeNetV2()
    bf.load_mmseg_checkpoint(backbone, _mmcv_checkpoint(source))
    _assert_same(backbone, source.backbone)


def test_mismatch_lists_missing_unexpected_and_wrong_shapes(source):
    state = dict(source.state_dict())
    del state["decode_head.conv_seg.bias"]
    state["decode_head.extra.weight"] = torch.zeros(1)
    state["auxiliary_head.0.conv_seg.weight"] = torch.zeros(3, 16, 1, 1)
    with pytest.raises(CheckpointMismatchError) as err:
        bf.load_mmseg_checkpoint(bf.BiSeNetV2Segmentor(), state)
    message = str(err.value)
    assert "missing (1)" in message and "decode_head.conv_seg.bias" in message
    assert "unexpected (1)" in message and "decode_head.extra.weight" in message
    assert "shape_mismatch (1)" in message and "auxiliary_head.0.conv_seg.weight: checkpoint (3, 16, 1, 1)" in message


def test_non_strict_loads_what_matches_and_reports_the_rest(source):
    state = dict(source.state_dict())
    state["decode_head.conv_seg.weight"] = torch.zeros(7, 1024, 1, 1)  # e.g. another class count
    target = bf.BiSeNetV2Segmentor()
    report = bf.load_mmseg_checkpoint(target, state, strict=False)
    assert report["shape_mismatch"] == ["decode_head.conv_seg.weight: checkpoint (7, 1024, 1, 1) vs model (19, 1024, 1, 1)"]
    assert torch.equal(target.backbone.bga.conv.conv.weight, source.backbone.bga.conv.conv.weight)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_refuses_a_pickle_that_would_execute_code(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "meta": _RunsCode()}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        bf.load_mmseg_checkpoint(bf.BiSeNetV2Segmentor(), path)


def test_rejects_non_tensor_entries():
    with pytest.raises(TypeError, match="str to Tensor"):
        bf.load_mmseg_checkpoint(bf.BiSeNetV2Segmentor(), {"state_dict": {"a": 1}})
