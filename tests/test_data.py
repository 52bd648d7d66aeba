"""Data: the spec §7 train pipeline step by step, the §5 test pipeline, the Cityscapes layout
and its errors, the labelIds conversion, the synthetic set and the resumable sampler."""
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bisenet_fast.data import transforms as T
from bisenet_fast.data.cityscapes import CLASSES, CityscapesDataset, MissingLabelsError, find_pairs
from bisenet_fast.data.convert import convert_tree, label_ids_to_train_ids
from bisenet_fast.data.sampler import InfiniteShardedSampler
from bisenet_fast.data.synthetic import generate, scene

ROOT = Path(__file__).resolve().parents[1]


class ScriptedRNG:
    """Stands in for numpy's RandomState: records every call, returns scripted values."""

    def __init__(self, randint=(), uniform=None, rand=(), random_sample=()):
        self.calls = []
        self._randint, self._rand, self._sample = list(randint), list(rand), list(random_sample)
        self._uniform = uniform

    def randint(self, low, high=None):
        self.calls.append(("randint", low, high))
        return self._randint.pop(0) if self._randint else low

    def uniform(self, low, high):
        self.calls.append(("uniform", low, high))
        return self._uniform if self._uniform is not None else (low + high) / 2

    def rand(self):
        self.calls.append(("rand",))
        return self._rand.pop(0)

    def random_sample(self):
        self.calls.append(("random_sample",))
        return self._sample.pop(0)


# ---------------------------------------------------------------- resize
@pytest.mark.parametrize("ratio, expected", [(0.5, (512, 1024)), (0.75, (768, 1536)), (1.0, (1024, 2048)),
                                             (1.9999, (2047, 4094)), (0.6172, (632, 1264))])
def test_rescale_size_of_cityscapes_frames(ratio, expected):
    scale = (int(2048 * ratio), int(1024 * ratio))
    assert T.rescale_size(1024, 2048, scale) == expected  # 1.9999: the short edge (2047) limits


def test_rescale_size_uses_imrescale_rounding():
    # factor = min(2048 / 1000, 1024 / 999) = 1.025025..., sizes int(x * f + 0.5)
    assert T.rescale_size(999, 1000, (2048, 1024)) == (1024, 1025)
    # factor = 1024 / 600: 999 * f = 1704.96 rounds up, where truncating would give 1704
    assert T.rescale_size(600, 999, (2048, 1024)) == (1024, 1705)
    assert T.rescale_size(1024, 2048, (2048, 1024)) == (1024, 2048)  # test pipeline: identity


def test_random_rescale_draws_ratio_in_range_and_resizes_both():
    img = np.zeros((64, 128, 3), np.uint8)
    label = np.zeros((64, 128), np.uint8)
    rng = ScriptedRNG(random_sample=[0.0])
    out_img, out_label = T.random_rescale(img, label, rng, img_scale=(128, 64), ratio_range=(0.5, 2.0))
    assert out_img.shape == (32, 64, 3) and out_label.shape == (32, 64)
    rng = ScriptedRNG(random_sample=[0.999])  # ratio 1.9985 -> scale (255, 127)
    assert T.random_rescale(img, label, rng, (128, 64), (0.5, 2.0))[0].shape == (127, 254, 3)


def test_bilinear_matches_cv2_half_pixel_rule():
    # cv2.resize([[0, 100]], (4, 1), INTER_LINEAR) == [[0, 25, 75, 100]] (edges clamped)
    img = np.array([[[0] * 3, [100] * 3]], np.uint8)
    assert T.resize_bilinear_uint8(img, (1, 4))[0, :, 0].tolist() == [0, 25, 75, 100]
    # exact 2x shrink: cv2 averages pixel pairs (no antialiasing beyond that), rounding half up
    row = np.array([[[10] * 3, [21] * 3, [200] * 3, [0] * 3]], np.uint8)
    assert T.resize_bilinear_uint8(row, (1, 2))[0, :, 0].tolist() == [16, 100]
    # 4x shrink does NOT average 4 pixels (that would be antialiasing): samples at x = 1.5
    row4 = np.array([[[0] * 3, [0] * 3, [100] * 3, [100] * 3]], np.uint8)
    assert T.resize_bilinear_uint8(row4, (1, 1))[0, 0, 0] == 50


CV2_RESIZE_FIXTURE = os.path.join(os.path.dirname(__file__), "data", "cv2_resize.npz")


def test_bilinear_is_bit_exact_with_recorded_cv2_outputs():
    # cv2.resize(src, (w, h), INTER_LINEAR) of seeded random images, recorded by
    # scripts/make_cv2_resize_fixture.py (tests/data/README.md): up- and downscales, odd sizes,
    # widths that are and are not multiples of 16, an exact x0.5 (cv2's INTER_AREA path), x0.25.
    fixture = np.load(CV2_RESIZE_FIXTURE)
    cases = sorted(int(k[len("src_"):]) for k in fixture.files if k.startswith("src_"))
    assert len(cases) >= 8
    mismatches = {}
    for i in cases:
        src, expected = fixture[f"src_{i}"], fixture[f"dst_{i}"]
        out = T.resize_bilinear_uint8(src, expected.shape[:2])
        assert out.dtype == np.uint8 and out.shape == expected.shape
        if not np.array_equal(out, expected):
            diff = np.abs(out.astype(int) - expected)
            mismatches[(src.shape[:2], expected.shape[:2])] = (int(np.count_nonzero(diff)), int(diff.max()))
    assert not mismatches, f"(source, output): (values that differ, max difference): {mismatches}"
    # A non-contiguous view (a flipped image) resizes as its contiguous copy does.
    src, expected = fixture[f"src_{cases[0]}"], fixture[f"dst_{cases[0]}"]
    flipped = T.resize_bilinear_uint8(src[:, ::-1], expected.shape[:2])
    assert np.array_equal(flipped, T.resize_bilinear_uint8(np.ascontiguousarray(src[:, ::-1]), expected.shape[:2]))


def test_nearest_uses_cv2_floor_index_rule():
    label = np.array([[1, 2, 3, 4]], np.uint8)
    assert T.resize_nearest(label, (1, 2)).tolist() == [[1, 3]]
    assert T.resize_nearest(label, (1, 8)).tolist() == [[1, 1, 2, 2, 3, 3, 4, 4]]
    assert T.resize_nearest(label, (1, 3)).tolist() == [[1, 2, 3]]  # floor(x * 4/3) = 0, 1, 2
    # cv2 computes the index in double precision, where torch's float32 scale picks the row
    # before at these rows of a 1024 -> 656 resize.
    rows = T.resize_nearest(np.arange(1024, dtype=np.int64).reshape(1024, 1), (656, 1))[:, 0]
    assert rows[[41, 82, 164]].tolist() == [64, 128, 256]
    assert rows.tolist() == [min(int(y * (1.0 / (656 / 1024))), 1023) for y in range(656)]


# ---------------------------------------------------------------- RandomCrop
def test_crop_acceptance_rule():
    assert not T.crop_is_acceptable(np.zeros((4, 4), np.uint8), 0.75)  # one class
    assert not T.crop_is_acceptable(np.array([0] * 8 + [1] * 2, np.uint8), 0.75)  # 80 %
    assert not T.crop_is_acceptable(np.array([0] * 3 + [1], np.uint8), 0.75)  # exactly 75 %: not under
    assert T.crop_is_acceptable(np.array([0] * 7 + [1] * 3, np.uint8), 0.75)
    # ignored pixels do not count: 2 x class 0, 2 x class 1 -> 50 %
    assert T.crop_is_acceptable(np.array([0, 0, 1, 1, 255, 255, 255, 255], np.uint8), 0.75)
    assert not T.crop_is_acceptable(np.array([0, 255, 255], np.uint8), 0.75)


def test_crop_tries_ten_times_then_takes_the_last_box():
    img = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    label = np.zeros((8, 8), np.uint8)  # a single class: every crop is rejected
    offsets = list(range(22))  # (y, x) offsets; all but the last pair rejected
    rng = ScriptedRNG(randint=[v % 5 for v in offsets])
    out_img, out_label = T.random_crop(img, label, (3, 3), rng, cat_max_ratio=0.75)
    assert len([c for c in rng.calls if c[0] == "randint"]) == 22  # 11 boxes, 2 draws each
    assert rng.calls[0] == ("randint", 0, 6)  # margins 8 - 3 + 1
    y, x = offsets[20] % 5, offsets[21] % 5
    assert np.array_equal(out_img, img[y : y + 3, x : x + 3])


def test_crop_stops_at_first_acceptable_box():
    label = np.zeros((8, 8), np.uint8)
    label[:, 4:] = 1
    rng = ScriptedRNG(randint=[0, 2])  # box x 2..5: half 0, half 1
    _, out_label = T.random_crop(np.zeros((8, 8, 3), np.uint8), label, (4, 4), rng)
    assert len(rng.calls) == 2 and out_label.shape == (4, 4)


def test_crop_of_a_small_image_keeps_its_whole_extent():
    img = np.zeros((5, 7, 3), np.uint8)
    rng = ScriptedRNG()
    out_img, out_label = T.random_crop(img, np.zeros((5, 7), np.uint8), (16, 16), rng, cat_max_ratio=1.0)
    assert out_img.shape == (5, 7, 3) and rng.calls == [("randint", 0, 1), ("randint", 0, 1)]


def test_flip_probability_rule():
    img = np.arange(6, dtype=np.uint8).reshape(1, 2, 3)
    label = np.array([[1, 2]], np.uint8)
    flipped = T.random_flip(img, label, ScriptedRNG(rand=[0.49]))
    assert flipped[1].tolist() == [[2, 1]] and flipped[0][0, 0].tolist() == [3, 4, 5]
    kept = T.random_flip(img, label, ScriptedRNG(rand=[0.5]))
    assert kept[1].tolist() == [[1, 2]]


# ---------------------------------------------------------------- PhotoMetricDistortion
def test_photometric_order_and_ranges_mode_1():
    img = np.full((2, 2, 3), 100, np.uint8)
    rng = ScriptedRNG(randint=[1, 1, 1, 1, 1, 5])  # brightness on, mode 1, contrast, saturation, hue on, shift 5
    T.PhotoMetricDistortion()(img, rng)
    assert rng.calls == [
        ("randint", 2, None), ("uniform", -32, 32),   # brightness
        ("randint", 2, None),                          # mode
        ("randint", 2, None), ("uniform", 0.5, 1.5),  # contrast (mode 1: before)
        ("randint", 2, None), ("uniform", 0.5, 1.5),  # saturation
        ("randint", 2, None), ("randint", -18, 18),   # hue, shift in [-18, 17]
    ]


def test_photometric_mode_0_applies_contrast_last_and_skips_off_steps():
    img = np.full((2, 2, 3), 100, np.uint8)
    rng = ScriptedRNG(randint=[0, 0, 0, 0, 1], uniform=1.5)  # only contrast (last) fires
    out = T.PhotoMetricDistortion()(img, rng)
    assert [c[0] for c in rng.calls] == ["randint"] * 5 + ["uniform"]
    assert out[0, 0].tolist() == [150, 150, 150]


def test_photometric_steps_change_what_they_name():
    """Each step's effect on a coloured pixel (the order tests above use a grey image, on
    which saturation and hue do nothing): brightness adds the drawn delta, saturation scales
    S, hue shifts H modulo 180 (cv2's uint8 hue range)."""
    distort = T.PhotoMetricDistortion()
    img = np.array([[[200, 100, 50]]], np.uint8)
    assert distort.brightness(img, ScriptedRNG(randint=[1], uniform=-20.0)).tolist() == [[[180, 80, 30]]]
    hsv = T.rgb_to_hsv_cv2(img)
    hsv[..., 1] = hsv[..., 1] // 2
    assert (distort.saturation(img, ScriptedRNG(randint=[1], uniform=0.5)) == T.hsv_to_rgb_cv2(hsv)).all()
    red = np.array([[[255, 0, 0]]], np.uint8)  # hue 0: a shift of -5 wraps to 175
    shifted = T.hsv_to_rgb_cv2(np.array([[[175, 255, 255]]], np.uint8))
    assert (distort.hue(red, ScriptedRNG(randint=[1, -5])) == shifted).all()


def test_brightness_and_contrast_clip_and_truncate():
    img = np.array([[[250, 10, 100]]], np.uint8)
    assert T.PhotoMetricDistortion.convert(img, beta=10.7).tolist() == [[[255, 20, 110]]]
    assert T.PhotoMetricDistortion.convert(img, alpha=0.5).tolist() == [[[125, 5, 50]]]
    assert T.PhotoMetricDistortion.convert(img, beta=-20.0).tolist() == [[[230, 0, 80]]]


@pytest.mark.parametrize("rgb, hsv", [
    ((255, 0, 0), (0, 255, 255)), ((0, 255, 0), (60, 255, 255)), ((0, 0, 255), (120, 255, 255)),
    ((128, 128, 128), (0, 0, 128)), ((0, 0, 0), (0, 0, 0)), ((255, 128, 0), (15, 255, 255)),
    ((255, 0, 128), (165, 255, 255)), ((100, 50, 25), (10, 191, 100)),
])
def test_hsv_matches_cv2_uint8(rgb, hsv):
    assert T.rgb_to_hsv_cv2(np.array([[rgb]], np.uint8))[0, 0].tolist() == list(hsv)


# cv2 4.10's COLOR_HSV2BGR (x86-64, AVX2 + FMA), read from a 256-pixel-wide image as mmseg's
# images are converted, in RGB order. The first four need its fused multiply-add, the last
# four its truncation: cv2's scalar path (1-pixel images) rounds, giving +1 there.
@pytest.mark.parametrize("hsv, rgb", [
    ((109, 150, 204), (84, 127, 204)), ((45, 85, 36), (30, 36, 24)), ((10, 228, 255), (255, 103, 26)),
    ((35, 204, 135), (117, 135, 26)), ((25, 158, 22), (22, 19, 8)), ((23, 107, 77), (77, 69, 44)),
    ((7, 8, 187), (187, 182, 181)), ((1, 96, 126), (126, 80, 78)),
])
def test_hsv_to_rgb_matches_cv2_vectorised_uint8(hsv, rgb):
    wide = np.tile(np.array([[hsv]], np.uint8), (1, 256, 1))
    assert (T.hsv_to_rgb_cv2(wide) == np.array(rgb, np.uint8)).all()


def test_hsv_round_trip_is_close():
    rgb = np.random.RandomState(0).randint(0, 256, (32, 32, 3)).astype(np.uint8)
    back = T.hsv_to_rgb_cv2(T.rgb_to_hsv_cv2(rgb)).astype(int)
    err = np.abs(back - rgb)
    assert err.max() <= 5 and err.mean() < 1.5  # hue is quantised to 2 degrees
    assert T.hsv_to_rgb_cv2(np.array([[[0, 255, 255]]], np.uint8)).tolist() == [[[255, 0, 0]]]
    assert T.hsv_to_rgb_cv2(np.array([[[60, 255, 255]]], np.uint8)).tolist() == [[[0, 255, 0]]]


# ---------------------------------------------------------------- normalise, pad, whole pipelines
def test_normalize_and_pad_values():
    img = np.tile(np.array(T.MEAN_RGB, np.float32).round().astype(np.uint8), (2, 3, 1))
    x = T.normalize(img)
    assert x.shape == (3, 2, 3) and x.abs().max() < 0.01
    # The constants themselves are the configs' (tests/test_recipes_match_mmseg.py).
    img = np.random.RandomState(0).randint(0, 256, (5, 7, 3), dtype=np.uint8)
    expected = (torch.from_numpy(img).permute(2, 0, 1).double() - torch.tensor(T.MEAN_RGB, dtype=torch.float64)[:, None, None]) \
        / torch.tensor(T.STD_RGB, dtype=torch.float64)[:, None, None]
    torch.testing.assert_close(T.normalize(img).double(), expected, atol=1e-5, rtol=0)
    padded, label = T.pad_to(x + 1, np.zeros((2, 3), np.uint8), (4, 5))
    assert padded.shape == (3, 4, 5) and label.shape == (4, 5)
    assert (padded[:, 2:] == 0).all() and (padded[:, :, 3:] == 0).all()
    assert (label[2:] == 255).all() and (label[:, 3:] == 255).all() and (label[:2, :3] == 0).all()


# (grey level, RGB channel, mmcv.imnormalize's float32 output) recorded with opencv-python-headless
# 5.0.0: cv2.subtract in float32, then cv2.multiply by the float64 1 / std, rounded once. Each
# is one ulp away from a float32 (x - mean) / std.
IMNORMALIZE_VALUES = [
    (0, 1, -2.0357141494750977), (28, 0, -1.6384109258651733), (62, 1, -0.9502800703048706),
    (97, 0, -0.4568028748035431), (119, 1, 0.04761906713247299), (149, 1, 0.5728291273117065),
    (184, 0, 1.033050775527954), (217, 0, 1.5981676578521729), (237, 1, 2.113445281982422),
]


@pytest.mark.parametrize("grey, channel, expected", IMNORMALIZE_VALUES)
def test_normalize_rounds_as_mmcv_imnormalize(grey, channel, expected):
    img = np.full((1, 1, 3), grey, np.uint8)
    assert T.normalize(img)[channel, 0, 0].item() == expected


@pytest.mark.parametrize("img", [np.zeros((2, 3, 3), np.float32), np.zeros((2, 3, 3), np.uint16),
                                 np.zeros((2, 3), np.uint8), np.zeros((2, 3, 4), np.uint8)])
def test_normalize_refuses_what_is_not_a_uint8_rgb_image(img):
    with pytest.raises(TypeError, match=r"normalize: img must be a uint8 H x W x 3 array"):
        T.normalize(img)


def test_train_pipeline_output_shapes_values_and_determinism():
    img, label = scene(0, "train", 1, height=64, width=128)
    pipeline = T.TrainPipeline(img_scale=(128, 64), crop_size=(48, 48))
    padded_seen = False
    for seed in range(12):
        x, y = pipeline(img, label, np.random.RandomState(seed))
        assert x.shape == (3, 48, 48) and x.dtype == torch.float32 and y.shape == (48, 48) and y.dtype == torch.int64
        assert set(y.unique().tolist()) <= set(np.unique(label).tolist()) | {255}
        padded_seen |= bool((y[-1] == 255).all() and (x[:, -1] == 0).all())
        x2, y2 = pipeline(img, label, np.random.RandomState(seed))
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert padded_seen  # ratios under 0.75 make 48-row images: padded at the bottom


def test_train_pipeline_runs_the_steps_in_mmseg_order():
    """Resize, RandomCrop, RandomFlip, PhotoMetricDistortion, Normalize, Pad: the config's
    train_pipeline (tests/test_recipes_match_mmseg.py), drawing from one RandomState in turn."""
    img, label = scene(0, "train", 1, height=64, width=128)
    pipeline = T.TrainPipeline(img_scale=(128, 64), crop_size=(48, 48))
    for seed in range(8):
        x, y = pipeline(img, label, np.random.RandomState(seed))
        rng = np.random.RandomState(seed)
        step_img, step_label = T.random_rescale(img, label, rng, (128, 64), (0.5, 2.0))
        step_img, step_label = T.random_crop(step_img, step_label, (48, 48), rng, 0.75)
        step_img, step_label = T.random_flip(step_img, step_label, rng, 0.5)
        step_img = T.PhotoMetricDistortion()(np.ascontiguousarray(step_img), rng)
        expected_x, expected_y = T.pad_to(T.normalize(step_img), np.ascontiguousarray(step_label), (48, 48))
        assert torch.equal(x, expected_x) and np.array_equal(y.numpy(), expected_y)


def test_test_pipeline_keeps_cityscapes_size():
    img = np.zeros((32, 64, 3), np.uint8)
    x, y = T.TestPipeline(img_scale=(64, 32))(img, np.zeros((32, 64), np.uint8))
    assert x.shape == (3, 32, 64) and y.shape == (32, 64)


# ---------------------------------------------------------------- Cityscapes layout, conversion, synthetic
def test_missing_labels_are_listed(tmp_path):
    generate(tmp_path, num_train=3, num_val=1, height=32, width=64)
    labels = sorted((tmp_path / "gtFine" / "train").rglob("*.png"))
    labels[0].unlink()
    labels[2].unlink()
    with pytest.raises(MissingLabelsError) as err:
        find_pairs(tmp_path, "train")
    msg = str(err.value)
    assert "2 of 3 images" in msg and labels[0].name in msg and labels[2].name in msg
    assert labels[1].name not in msg and "bisenet_fast.data.convert" in msg


@pytest.mark.parametrize("num_classes, ignore_index, bad", [(19, 255, 26), (19, 0, 255), (2, 255, 2)])
def test_dataset_with_num_classes_names_a_label_of_another_kind(tmp_path, num_classes, ignore_index, bad):
    generate(tmp_path, num_train=2, num_val=1, height=32, width=64)
    pairs = find_pairs(tmp_path, "train")
    label = np.zeros((32, 64), dtype=np.uint8)
    Image.fromarray(label).save(pairs[0][1])
    label[3, 5] = bad
    Image.fromarray(label).save(pairs[1][1])
    checked = CityscapesDataset(tmp_path, "train", num_classes=num_classes, ignore_index=ignore_index)
    checked[0]
    with pytest.raises(ValueError, match=re.escape(
            f"{pairs[1][1]}: label values must be in [0, {num_classes}) or {ignore_index}, found {bad} (labelIds not "
            f"yet converted to trainIds? run python -m bisenet_fast.data.convert {tmp_path})")):
        checked[1]
    CityscapesDataset(tmp_path, "train")[1]  # without num_classes, labels are not read for their values


def test_split_listing_follows_symlinked_cities_and_skips_dot_files(tmp_path):
    """As mmseg lists a split (mmcv's scandir): a city directory that is a symlink is read
    (Path.rglob would silently leave its images out), and a name starting with '.' (macOS's
    ._* AppleDouble copies) is no image."""
    generate(tmp_path / "data", num_train=2, num_val=1, height=32, width=64)
    cities = tmp_path / "data" / "leftImg8bit" / "train"
    (cities / "synthville").rename(tmp_path / "synthville")
    (cities / "synthville").symlink_to(tmp_path / "synthville", target_is_directory=True)
    (cities / "synthville" / "._synthville_000000_000019_leftImg8bit.png").write_bytes(b"not a PNG")
    pairs = find_pairs(tmp_path / "data", "train")
    assert [image.name for image, _ in pairs] == [f"synthville_{i:06d}_000019_leftImg8bit.png" for i in range(2)]
    assert all(label.is_file() for _, label in pairs)


def test_convert_skips_dot_files(tmp_path):
    """A ._*_gtFine_labelIds.png AppleDouble copy is not a label to convert (nor to fail on)."""
    city = tmp_path / "gtFine" / "val" / "x"
    city.mkdir(parents=True)
    Image.fromarray(np.array([[7, 8]], np.uint8)).save(city / "a_000000_000000_gtFine_labelIds.png")
    (city / "._a_000000_000000_gtFine_labelIds.png").write_bytes(b"not a PNG")
    assert convert_tree(tmp_path, workers=1) == 1
    assert not (city / "._a_000000_000000_gtFine_labelTrainIds.png").exists()


def test_missing_split_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="leftImg8bit/val"):
        CityscapesDataset(tmp_path, "val")


def test_dataset_items(tmp_path):
    generate(tmp_path, num_train=2, num_val=1, height=32, width=64)
    raw = CityscapesDataset(tmp_path, "val")
    img, label = raw[0]
    expected_img, expected_label = scene(0, "val", 0, 32, 64)
    assert torch.equal(img, torch.from_numpy(expected_img)) and torch.equal(label, torch.from_numpy(expected_label))
    train = CityscapesDataset(tmp_path, "train", T.TrainPipeline(img_scale=(64, 32), crop_size=(16, 16)))
    x, y = train[(1, 123)]
    assert x.shape == (3, 16, 16) and y.shape == (16, 16)


def test_label_ids_to_train_ids_table(tmp_path):
    ids = np.array([[0, 7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33],
                    [1, 6, 9, 10, 14, 15, 16, 18, 29, 30, 2, 3, 4, 5, 34, 255, 7, 7, 7, 7]], np.uint8)
    out = label_ids_to_train_ids(ids)
    assert out[0].tolist() == [255] + list(range(19))
    assert out[1, :16].tolist() == [255] * 16
    src = tmp_path / "gtFine" / "val" / "x" / "a_000000_000000_gtFine_labelIds.png"
    src.parent.mkdir(parents=True)
    Image.fromarray(ids).save(src)
    assert convert_tree(tmp_path, workers=1) == 1
    written = np.array(Image.open(src.with_name("a_000000_000000_gtFine_labelTrainIds.png")))
    assert np.array_equal(written, out)


@pytest.mark.parametrize("mode, values", [("I;16", [7, 263]), ("RGB", None)])
def test_convert_refuses_labels_that_are_not_8_bit(tmp_path, mode, values):
    """A 16-bit id would wrap onto a trainId (263 -> 7 -> road) if cast to uint8."""
    src = tmp_path / "gtFine" / "val" / "x" / "a_000000_000000_gtFine_labelIds.png"
    src.parent.mkdir(parents=True)
    image = Image.fromarray(np.array([values], np.uint16)).convert(mode) if values else Image.new(mode, (2, 1))
    image.save(src)
    assert Image.open(src).mode == mode
    with pytest.raises(ValueError, match=f"labelIds must be an 8-bit single-channel PNG \\(mode L\\), got mode {mode}"):
        convert_tree(tmp_path, workers=1)


def test_synthetic_scenes_are_deterministic_and_cover_all_classes():
    a = scene(0, "val", 3)
    b = scene(0, "val", 3)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], scene(1, "val", 3)[0])
    seen = set()
    for i in range(40):
        seen |= set(np.unique(scene(0, "val", i)[1]).tolist())
    assert seen == set(range(len(CLASSES))) | {255}


@pytest.mark.parametrize("height, width", [(1, 1), (3, 2)])
def test_synthetic_command_finishes_at_any_size(tmp_path, height, width):
    """The skyline's pieces were drawn 0 pixels wide below ~7 pixels of width, so a scene 1 or
    2 pixels wide never finished and the command hung. Run as a child process with a timeout,
    so that a hang fails the test instead of stalling the suite."""
    cmd = [sys.executable, "-m", "bisenet_fast.data.synthetic", str(tmp_path), "--train", "1", "--val", "1",
           "--height", str(height), "--width", str(width)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    img, label = scene(0, "val", 0, height, width)
    assert img.shape == (height, width, 3) and label.shape == (height, width)


# ---------------------------------------------------------------- sampler
def test_sampler_shards_cover_the_dataset_and_resume_exactly():
    size, world = 10, 3
    streams = [list(itertools.islice(InfiniteShardedSampler(size, r, world, seed=5), 8)) for r in range(world)]
    first_epoch = [idx for s in streams for idx, _ in s[:4]]  # ceil(10 / 3) = 4 per rank
    assert set(first_epoch) == set(range(size))
    full = list(itertools.islice(InfiniteShardedSampler(size, 1, world, seed=5), 11))
    resumed = list(itertools.islice(InfiniteShardedSampler(size, 1, world, seed=5, start=6), 5))
    assert resumed == full[6:]
    seeds = [s for _, s in full]
    assert len(set(seeds)) == len(seeds)
    # Each rank augments its item of a step with its own seed, not the same crop and flip as the others.
    assert len({s[0][1] for s in streams}) == world


def test_sampler_pads_a_dataset_smaller_than_the_padding():
    """One image over four processes: every rank gets it (the padding repeats the order as
    often as it must)."""
    streams = [list(itertools.islice(InfiniteShardedSampler(1, r, 4, seed=5), 2)) for r in range(4)]
    assert [[idx for idx, _ in s] for s in streams] == [[0, 0]] * 4
