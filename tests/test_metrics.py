"""mIoU (spec §9) on hand-made cases (accumulation over images, ignore masking, absent classes)
and the whole-image / ms+flip inference it is computed from (spec §5)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bisenet_fast.data.transforms import normalize
from bisenet_fast.inference import predict_probs
from bisenet_fast.metrics import IoUAccumulator, area_histograms, format_table


def t(rows):
    return torch.tensor(rows, dtype=torch.int64)


def test_histograms_of_one_image():
    pred = t([[0, 0, 1], [1, 2, 2]])
    label = t([[0, 1, 1], [1, 2, 255]])
    inter, area_pred, area_label = area_histograms(pred, label, num_classes=3)
    # the ignored pixel (pred 2) counts nowhere
    assert inter.tolist() == [1, 2, 1]
    assert area_pred.tolist() == [2, 2, 1]
    assert area_label.tolist() == [1, 3, 1]


def test_iou_sums_areas_over_the_set_not_a_mean_of_image_ious():
    acc = IoUAccumulator(num_classes=2)
    acc.update(t([[0, 0, 0, 0]]), t([[0, 0, 0, 0]]))  # class 0 perfect on image 1
    acc.update(t([[1, 1, 1, 1]]), t([[0, 1, 1, 1]]))  # class 0 missed once on image 2
    res = acc.result()
    # class 0: I=4, P=4, L=5 -> 4/5 ; class 1: I=3, P=4, L=3 -> 3/4
    assert res["IoU"] == pytest.approx([80.0, 75.0])
    assert res["mIoU"] == pytest.approx(77.5)
    # a mean of per-image IoUs would give class 0 (100 + 0) / 2 = 50 instead
    assert res["aAcc"] == pytest.approx(100 * 7 / 8)


def test_absent_class_is_nan_and_skipped():
    acc = IoUAccumulator(num_classes=4)
    acc.update(t([[0, 1, 1]]), t([[0, 1, 255]]))
    res = acc.result()
    assert res["IoU"][0] == 100.0 and res["IoU"][1] == 100.0
    assert math.isnan(res["IoU"][2]) and math.isnan(res["IoU"][3])
    assert res["mIoU"] == pytest.approx(100.0)


def test_predicted_but_absent_class_has_zero_iou_and_counts():
    acc = IoUAccumulator(num_classes=3)
    acc.update(t([[0, 2]]), t([[0, 0]]))
    res = acc.result()
    assert res["IoU"][0] == pytest.approx(50.0)
    assert math.isnan(res["IoU"][1])
    assert res["IoU"][2] == 0.0  # union 1 (predicted only), intersection 0
    assert res["mIoU"] == pytest.approx(25.0)


def test_all_ignored_gives_nan_miou():
    acc = IoUAccumulator(num_classes=2)
    acc.update(t([[0, 1]]), t([[255, 255]]))
    assert math.isnan(acc.result()["mIoU"])


def test_bad_labels_and_shapes_raise():
    with pytest.raises(ValueError, match="same shape"):
        area_histograms(t([[0, 1]]), t([[0]]), 2)
    with pytest.raises(ValueError, match=r"label values must be in \[0, 2\)"):
        area_histograms(t([[0, 1]]), t([[0, 7]]), 2)


def test_uint8_labels_compare_as_integers():
    """ignore_index=-1 does not ignore a uint8 label 255 (wrapped, it would)."""
    with pytest.raises(ValueError, match=r"label values must be in \[0, 2\) or -1"):
        area_histograms(t([[0, 1]]), t([[0, 255]]).to(torch.uint8), 2, ignore_index=-1)


def test_label_equal_to_num_classes_raises():
    with pytest.raises(ValueError, match=r"label values must be in \[0, 2\)"):
        area_histograms(t([[0, 1]]), t([[0, 2]]), 2)


def test_out_of_range_predictions_count_in_no_class():
    """As mmseg's histc over [0, C - 1]: a prediction outside the classes counts nowhere."""
    intersection, area_pred, area_label = area_histograms(t([[0, 5, -1]]), t([[0, 1, 1]]), 2)
    assert area_pred.tolist() == [1, 0] and intersection.tolist() == [1, 0] and area_label.tolist() == [1, 2]


def test_aacc_divides_by_the_labelled_area_not_the_predicted_one():
    """mmseg's aAcc is intersection / label area: predictions outside the classes count in
    neither, so the two areas differ (1 of 3 labelled pixels hit, not 1 of 1 predicted)."""
    acc = IoUAccumulator(num_classes=2)
    acc.update(t([[0, 5, -1]]), t([[0, 1, 1]]))
    assert acc.result()["aAcc"] == pytest.approx(100 / 3)


def test_table_lists_every_class():
    acc = IoUAccumulator(num_classes=2)
    acc.update(t([[0, 1]]), t([[0, 1]]))
    table = format_table(acc.result(), ["road", "sidewalk"])
    assert "road" in table and "sidewalk" in table and "mIoU 100.00" in table


# ---------------------------------------------------------------- inference for evaluation (spec §5)

class PixelModel(nn.Module):
    """A 1x1 conv: pixel-wise, so flip-equivariant and the same at every scale on flat images."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x)


def test_single_scale_is_softmax_of_the_whole_image_logits():
    model = PixelModel()
    image = torch.from_numpy(np.random.RandomState(0).randint(0, 256, (8, 16, 3)).astype(np.uint8))
    probs = predict_probs(model, image, img_scale=(16, 8))
    expected = model(normalize(image.numpy())[None]).softmax(dim=1)[0]
    torch.testing.assert_close(probs, expected)


def test_flip_passes_are_flipped_back():
    model = PixelModel()
    image = torch.from_numpy(np.random.RandomState(1).randint(0, 256, (8, 16, 3)).astype(np.uint8))
    single = predict_probs(model, image, img_scale=(16, 8))
    both = predict_probs(model, image, img_scale=(16, 8), flip=True)
    torch.testing.assert_close(both, 2 * single)  # un-flipped: the pixel-wise model agrees with itself


def test_multi_scale_passes_are_resized_to_the_original_size_and_summed():
    model = PixelModel()
    image = torch.full((8, 16, 3), 77, dtype=torch.uint8)  # flat: every scale gives the same probabilities
    ratios = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    probs = predict_probs(model, image, img_scale=(16, 8), ratios=ratios, flip=True)
    assert probs.shape == (4, 8, 16)
    single = predict_probs(model, image, img_scale=(16, 8))
    torch.testing.assert_close(probs, 12 * single)


def test_multi_scale_uses_the_scaled_input_sizes():
    sizes = []

    class Recorder(PixelModel):
        def forward(self, x):
            sizes.append(tuple(x.shape[-2:]))
            return super().forward(x)

    image = torch.zeros((32, 64, 3), dtype=torch.uint8)
    predict_probs(Recorder(), image, img_scale=(64, 32), ratios=(0.5, 1.75), flip=True)
    assert sizes == [(16, 32), (16, 32), (56, 112), (56, 112)]


def test_logits_are_resized_bilinearly_without_align_corners():
    class Coarse(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return torch.tensor([[0.0, 4.0], [4.0, 0.0]]).view(1, 2, 1, 2) + self.p

    probs = predict_probs(Coarse(), torch.zeros((1, 4, 3), dtype=torch.uint8), img_scale=(4, 1))
    logits = F.interpolate(torch.tensor([[0.0, 4.0], [4.0, 0.0]]).view(1, 2, 1, 2), size=(1, 4), mode="bilinear",
                           align_corners=False)
    torch.testing.assert_close(probs, logits.softmax(dim=1)[0])
