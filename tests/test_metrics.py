"""mIoU (spec §9) on hand-made cases: accumulation over images, ignore masking, absent classes."""
import math

import pytest
import torch

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


def test_table_lists_every_class():
    acc = IoUAccumulator(num_classes=2)
    acc.update(t([[0, 1]]), t([[0, 1]]))
    table = format_table(acc.result(), ["road", "sidewalk"])
    assert "road" in table and "sidewalk" in table and "mIoU 100.00" in table
