"""The model is mmseg's: names, order, shapes, parameter counts, output sizes, init,
train/eval behaviour, and the loss as spec §6 computes it."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bisenet_fast as bf

from tests.helpers import MMSEG_REFERENCE


def _reference_state_dict():
    with open(os.path.join(MMSEG_REFERENCE, "mmseg_bisenetv2_state_dict.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def segmentor():
    torch.manual_seed(0)
    return bf.BiSeNetV2Segmentor(num_classes=19)


def test_state_dict_keys_order_shapes_dtypes_match_mmseg(segmentor):
    reference = _reference_state_dict()
    ours = segmentor.state_dict()
    assert len(reference) == 385
    assert list(ours) == [key for key, _, _ in reference]
    for key, shape, dtype in reference:
        assert list(ours[key].shape) == shape, key
        assert str(ours[key].dtype).replace("torch.", "") == dtype, key


@pytest.mark.parametrize(
    "part, expected",
    [
        ("backbone", 2_157_712),
        ("backbone.detail", 519_232),
        ("backbone.semantic", 1_159_504),
        ("backbone.bga", 478_976),
        ("decode_head", 1_201_171),
        ("auxiliary_head.0", 4_995),
        ("auxiliary_head.1", 56_787),
        ("auxiliary_head.2", 743_187),
        ("auxiliary_head.3", 10_640_403),
        ("", 14_804_255),
    ],
)
def test_parameter_counts_per_part(segmentor, part, expected):
    module = segmentor.get_submodule(part) if part else segmentor
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == expected


def test_state_dict_element_count(segmentor):
    assert sum(t.numel() for t in segmentor.state_dict().values()) == 14_827_085


def test_only_bga_pointwise_convs_and_conv_seg_have_bias(segmentor):
    with_bias = sorted(name for name, m in segmentor.named_modules() if isinstance(m, nn.Conv2d) and m.bias is not None)
    assert len([m for m in segmentor.modules() if isinstance(m, nn.Conv2d)]) == 68
    assert with_bias == sorted(
        [
            "backbone.bga.detail_dwconv.0.pointwise_conv.conv",
            "backbone.bga.semantic_dwconv.0.pointwise_conv.conv",
            "decode_head.conv_seg",
        ]
        + [f"auxiliary_head.{i}.conv_seg" for i in range(4)]
    )


@pytest.mark.parametrize(
    "size, expected",
    [
        # (H, W) -> bga, stage1, stage2, stage3, stage4 spatial sizes (spec §2.4)
        ((1024, 2048), [(128, 256), (256, 512), (128, 256), (64, 128), (32, 64)]),
        ((1025, 2049), [(129, 257), (257, 513), (129, 257), (65, 129), (33, 65)]),
        ((1000, 1000), [(125, 125), (250, 250), (125, 125), (63, 63), (32, 32)]),
        ((67, 101), [(9, 13), (17, 26), (9, 13), (5, 7), (3, 4)]),
    ],
)
def test_backbone_output_shapes(size, expected):
    torch.manual_seed(0)
    backbone = bf.BiSeNetV2().eval()
    with torch.no_grad(), bf.backends.use("eager"):
        outs = backbone(torch.randn(1, 3, *size))
    assert [tuple(o.shape[-2:]) for o in outs] == expected
    assert [o.shape[1] for o in outs] == [128, 16, 32, 64, 128]


def test_out_indices_select_outputs():
    torch.manual_seed(0)
    full = bf.BiSeNetV2().eval()
    partial = bf.BiSeNetV2(out_indices=(4, 0)).eval()
    partial.load_state_dict(full.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), bf.backends.use("eager"):
        a, b = full(x), partial(x)
    torch.testing.assert_close(b[0], a[4])
    torch.testing.assert_close(b[1], a[0])


@pytest.mark.parametrize("out_indices", [(5,), (0, -6), (1.0,), (True,)])
def test_out_indices_outside_the_five_outputs_are_refused_when_built(out_indices):
    # not an IndexError at the first forward
    with pytest.raises(ValueError, match=r"out_indices must be indices into the backbone's 5 outputs"):
        bf.BiSeNetV2(out_indices=out_indices)


@pytest.mark.parametrize("kwargs, match", [
    (dict(semantic_expansion_ratio=0), "semantic_expansion_ratio must be a positive int, got 0"),
    (dict(semantic_expansion_ratio=1.5), "semantic_expansion_ratio must be a positive int, got 1.5"),
    (dict(detail_channels=(64, 64, 16), semantic_channels=(16,), bga_channels=16, out_indices=(0,)),
     "semantic_channels must have one stage more than detail_channels .* got 1 and 3 stages"),
])
def test_a_backbone_that_cannot_work_is_refused_when_built(kwargs, match):
    # not a torch error from inside nn.Conv2d, nor a size mismatch inside the BGA op at the first forward
    with pytest.raises(ValueError, match=match):
        bf.BiSeNetV2(**kwargs)


@pytest.mark.parametrize("num_classes", [0, -1, 2.5, True, "19"])
def test_num_classes_must_be_a_positive_int(num_classes):
    # 0 would build a head with no classes; the others failed inside nn.Conv2d, not naming num_classes
    with pytest.raises(ValueError, match=f"num_classes must be a positive int, got {num_classes!r}"):
        bf.BiSeNetV2Segmentor(num_classes=num_classes)


def test_head_logit_shapes_and_eval_forward_resizes(segmentor):
    segmentor.eval()
    x = torch.randn(2, 3, 67, 101)
    with torch.no_grad(), bf.backends.use("eager"):
        heads = segmentor.head_logits(x)
        out = segmentor(x)
    assert {k: tuple(v.shape) for k, v in heads.items()} == {
        "decode": (2, 19, 9, 13),
        "aux_0": (2, 19, 17, 26),
        "aux_1": (2, 19, 9, 13),
        "aux_2": (2, 19, 5, 7),
        "aux_3": (2, 19, 3, 4),
    }
    assert out.shape == (2, 19, 67, 101)
    expected = F.interpolate(heads["decode"], size=(67, 101), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected)


def test_initialisation_matches_mmseg():
    torch.manual_seed(0)
    model = bf.BiSeNetV2Segmentor()
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
        elif isinstance(m, nn.Conv2d):
            if m.bias is not None:
                assert torch.all(m.bias == 0), name
            if name.endswith("conv_seg"):
                assert abs(m.weight.std().item() - 0.01) < 0.002, name
            elif m.weight.numel() > 10_000:
                # kaiming normal, mode fan_out, relu gain: std = sqrt(2 / (out/groups * k * k))
                fan_out = m.out_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                assert abs(m.weight.std().item() / (2.0 / fan_out) ** 0.5 - 1) < 0.05, name


def test_train_mode_uses_dropout_and_batch_statistics():
    torch.manual_seed(0)
    model = bf.BiSeNetV2Segmentor()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), bf.backends.use("eager"):
        model.train()
        heads_a = model.head_logits(x)
        heads_b = model.head_logits(x)
        model.eval()
        eval_a = model(x)
        eval_b = model(x)
    # Dropout2d(0.1) before every conv_seg is random in training ...
    assert not torch.equal(heads_a["aux_3"], heads_b["aux_3"])
    # ... and eval is deterministic, using the running statistics the two passes updated.
    torch.testing.assert_close(eval_a, eval_b, rtol=0, atol=0)
    bn = model.backbone.detail.detail_branch[0][0].bn
    assert bn.num_batches_tracked.item() == 2
    assert not torch.all(bn.running_mean == 0)
    assert [type(m) for m in model.modules() if isinstance(m, nn.Dropout2d)] == [nn.Dropout2d] * 5
    assert all(m.p == 0.1 for m in model.modules() if isinstance(m, nn.Dropout2d))


def _direct_head_loss(logits, target, thresh, min_kept, ignore_index=255):
    """mmseg's per-head loss written out by hand from spec §6."""
    n, _, height, width = target.shape[0], None, *target.shape[-2:]
    up = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)
    log_p = up.log_softmax(1)
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    ce = -log_p.gather(1, safe[:, None])[:, 0] * valid
    weight = valid.float()
    if thresh is not None:
        prob = log_p.exp().gather(1, safe[:, None])[:, 0]
        valid_prob = torch.sort(prob[valid]).values
        t_min = valid_prob[min(min_kept * n, valid_prob.numel() - 1)].item() if valid_prob.numel() else 0.0
        weight = (valid & (prob < torch.tensor(max(t_min, thresh), dtype=torch.float32))).float()
    return (ce * weight).sum() / (n * height * width)


def test_loss_names_a_target_that_is_not_a_tensor():
    model = bf.BiSeNetV2Segmentor().train()
    with pytest.raises(TypeError, match="target must be a torch.Tensor, got list"):  # not "no attribute 'dim'"
        model.loss(torch.randn(2, 3, 32, 32), [[0, 1], [1, 0]])


# thresh 0.01: an untrained head's probabilities (~1/19) all lie above it, so the budget
# (min_kept * N = 100 of ~7000 valid pixels) alone sets which pixels count; at 0.7 all do.
@pytest.mark.parametrize("ohem, thresh", [(False, None), (True, 0.7), (True, 0.01)])
def test_loss_matches_direct_computation(ohem, thresh):
    torch.manual_seed(0)
    model = bf.BiSeNetV2Segmentor(ohem=ohem, ohem_thresh=thresh or 0.7, ohem_min_kept=50).train()
    x = torch.randn(2, 3, 64, 64)
    target = torch.randint(0, 19, (2, 64, 64))
    target[:, :8] = 255
    with bf.backends.use("eager"):
        torch.manual_seed(1)
        losses = model.loss(x, target[:, None])  # mmseg's (N, 1, H, W) label layout
        torch.manual_seed(1)
        heads = model.head_logits(x)  # same dropout draws
    assert list(losses) == ["decode.loss_ce"] + [f"aux_{i}.loss_ce" for i in range(4)]
    for name, logits in heads.items():
        expected = _direct_head_loss(logits, target, thresh, 50)
        torch.testing.assert_close(losses[f"{name}.loss_ce"], expected, rtol=1e-5, atol=1e-6)
    total = sum(losses.values())
    total.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
