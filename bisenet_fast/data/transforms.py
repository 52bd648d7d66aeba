"""mmseg 0.x's Cityscapes pipelines (spec §5 and §7) in numpy/torch, without OpenCV.

Images are uint8 HxWx3 arrays in **RGB** order (PIL's order). mmseg works on cv2's BGR
images and swaps to RGB in Normalize; every step before that is either channel-order
independent or (HSV) written for RGB input so that it equals cv2's BGR2HSV on the BGR
image. The results are identical to mmseg's (mmcv 1.x, cv2 backend), resize included, with
one exception: cv2 converts HSV back to BGR in SIMD lanes and the few pixels a row's width
leaves over in scalar code, which rounds instead of truncating; this module truncates
everywhere, so at widths that are not a multiple of cv2's lane count (not Cityscapes' 1024
crops) those last pixels of a row may differ by one grey level after a hue or saturation
change (hsv_to_rgb_cv2).

Bilinear resize is cv2.resize(INTER_LINEAR) on uint8, reproduced in numpy integer arithmetic
(resize_bilinear_uint8; checked against opencv-python-headless 4.10.0 and 5.0.0 on x86_64: 0 of
about 5e8 values differ over 350 size pairs, mmseg's train and test sizes among them):
- taps (linear_taps): source position (i + 0.5) * scale - 0.5 in double, scale = 1 / (dst / src),
  stored as float32; weights round(2048 * (1 - f)) and round(2048 * f) from the float32
  fraction f (11-bit fixed point). Columns outside the image take the edge pixel with weight
  (2048, 0); rows are only clamped, keeping their weights.
- horizontal pass first, into int32 (units of 1/2048), then the vertical pass with cv2's 8-bit
  rule ((b0 * (S0 >> 4)) >> 16) + ((b1 * (S1 >> 4)) >> 16), + 2 >> 2. cv2's SIMD lanes and its
  scalar tail use this same formula, so no pixel depends on the SIMD width. (It is not the
  correctly rounded value: torch's float32 bilinear rounded half up differs from it in 12-13%
  of the values, by one grey level.)
- an exact halving of both sides is cv2's INTER_AREA path, the 2x2 mean rounded half up
  ((a + b + c + d + 2) >> 2); the same size is a copy.
(PIL's BILINEAR antialiases when shrinking and would not match.) Labels use nearest neighbour
with cv2's INTER_NEAREST index rule, floor(dst * src/dst) in double precision.

Randomness comes from a numpy RandomState passed in (the same legacy methods mmseg calls
on numpy's global RNG: random_sample, randint, rand, uniform), so a sample's augmentation
depends only on its seed, not on which DataLoader worker made it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MEAN_RGB = (123.675, 116.28, 103.53)
STD_RGB = (58.395, 57.12, 57.375)
IGNORE_INDEX = 255


# ---------------------------------------------------------------- resizing (mmcv imrescale)
def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv.imrescale's output (height, width) for keep_ratio resizing into `scale` (w, h) limits:
    factor = min(long_edge / max(h, w), short_edge / min(h, w)); size = int(x * factor + 0.5)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


# cv2's fixed-point bilinear resize works in units of 1/2048 (INTER_RESIZE_COEF_BITS = 11).
RESIZE_COEF_BITS = 11
RESIZE_COEF_ONE = 1 << RESIZE_COEF_BITS


def linear_taps(src: int, dst: int, clamp_weights: bool):
    """cv2 INTER_LINEAR's taps along one axis: for each of `dst` output indices the two source
    indices (clamped to the image) and their 11-bit weights.

    The source position (i + 0.5) * scale - 0.5 is computed in double with scale = 1 / (dst / src)
    and then stored as float32; its floor is the first tap and the float32 remainder f gives the
    weights round(2048 * (1 - f)) and round(2048 * f), each rounded half to even from float32 on
    its own. Along x (`clamp_weights`) a position left of the first pixel, or at or after the
    last one, takes that pixel with weights (2048, 0); along y the weights are kept and only the
    row indices are clamped, so the edge row is read twice."""
    scale = 1.0 / (dst / src)
    pos = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(pos)
    frac = pos - first
    first = first.astype(np.int64)
    if clamp_weights:
        frac[(first < 0) | (first >= src - 1)] = 0
        first = np.clip(first, 0, src - 1)
    one = np.float32(RESIZE_COEF_ONE)
    w0 = np.rint((np.float32(1) - frac) * one).astype(np.int32)
    w1 = np.rint(frac * one).astype(np.int32)
    return np.clip(first, 0, src - 1), np.clip(first + 1, 0, src - 1), w0, w1


def resize_bilinear_uint8(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR) for an HxWxC uint8 image, bit for
    bit (see the module docstring for the arithmetic)."""
    h, w = size
    src_h, src_w = img.shape[:2]
    if (src_h, src_w) == (h, w):
        return img.copy()
    img = np.ascontiguousarray(img)
    channels = img.shape[2] if img.ndim == 3 else 1
    if src_h == 2 * h and src_w == 2 * w:
        # cv2 takes its INTER_AREA path for an exact halving: the mean of each 2x2 block, + 2 >> 2.
        total = img[0::2, 0::2].astype(np.uint16)
        total += img[0::2, 1::2]
        total += img[1::2, 0::2]
        total += img[1::2, 1::2]
        total += 2
        total >>= 2
        return total.astype(np.uint8)

    # Horizontal pass, on only the source rows the output reads: int32 sums in units of 1/2048.
    row0, row1, wy0, wy1 = linear_taps(src_h, h, clamp_weights=False)
    rows, inverse = np.unique(np.concatenate([row0, row1]), return_inverse=True)
    col0, col1, wx0, wx1 = linear_taps(src_w, w, clamp_weights=True)
    flat = img.reshape(src_h, src_w * channels)[rows]
    offsets = np.arange(channels)
    col0 = (col0[:, None] * channels + offsets).ravel()
    col1 = (col1[:, None] * channels + offsets).ravel()
    horizontal = np.multiply(np.take(flat, col0, axis=1), np.repeat(wx0, channels), dtype=np.int32)
    horizontal += np.multiply(np.take(flat, col1, axis=1), np.repeat(wx1, channels), dtype=np.int32)
    # Vertical pass, cv2's formula for 8-bit output (its SIMD lanes and its scalar tail alike):
    # ((b0 * (S0 >> 4)) >> 16) + ((b1 * (S1 >> 4)) >> 16), then + 2 >> 2.
    horizontal >>= 4
    top, bottom = inverse[:h], inverse[h:]
    out = np.empty((h, w * channels), np.uint8)
    step = max(1, (1 << 17) // (w * channels))  # output rows per block (~0.5 MB of int32 temporaries)
    for y in range(0, h, step):
        block = slice(y, min(y + step, h))
        acc = horizontal[top[block]]
        acc *= wy0[block, None]
        acc >>= 16
        part = horizontal[bottom[block]]
        part *= wy1[block, None]
        part >>= 16
        acc += part
        acc += 2
        acc >>= 2
        np.minimum(acc, 255, out=acc)  # cv2 saturates; weights that sum to 2048 stay under 256 anyway
        out[block] = acc
    return out.reshape((h, w) + img.shape[2:])


def nearest_source_indices(src: int, dst: int) -> np.ndarray:
    """cv2 INTER_NEAREST's source index of each of `dst` output indices: floor(x * (1 / (dst /
    src))) in double precision, clamped to src - 1. (torch's mode='nearest' computes the scale
    in float32 and picks the row or column before in some sizes: 41 of 656 rows from 1024 are
    row 63 for torch, 64 for cv2.)"""
    inverse_scale = 1.0 / (dst / src)
    return np.minimum(np.floor(np.arange(dst) * inverse_scale).astype(np.int64), src - 1)


def resize_nearest(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """cv2.resize(label, (w, h), INTER_NEAREST), index for index."""
    if label.shape[:2] == tuple(size):
        return label.copy()
    rows = nearest_source_indices(label.shape[0], size[0])
    cols = nearest_source_indices(label.shape[1], size[1])
    return np.take(np.take(label, rows, axis=0), cols, axis=1)


def imrescale(img: np.ndarray, scale: tuple[int, int], is_label: bool = False) -> np.ndarray:
    size = rescale_size(img.shape[0], img.shape[1], scale)
    return resize_nearest(img, size) if is_label else resize_bilinear_uint8(img, size)


def random_rescale(img, label, rng: np.random.RandomState, img_scale=(2048, 1024), ratio_range=(0.5, 2.0)):
    """mmseg Resize(img_scale, ratio_range, keep_ratio=True): ratio ~ U[lo, hi),
    target (int(w_s * r), int(h_s * r)), then imrescale (image bilinear, label nearest)."""
    lo, hi = ratio_range
    ratio = rng.random_sample() * (hi - lo) + lo
    scale = (int(img_scale[0] * ratio), int(img_scale[1] * ratio))
    return imrescale(img, scale), imrescale(label, scale, is_label=True)


# ---------------------------------------------------------------- RandomCrop(cat_max_ratio)
def random_crop_box(shape, crop_size, rng: np.random.RandomState) -> tuple[int, int, int, int]:
    """(y1, y2, x1, x2) of a uniformly placed crop; the whole extent where the image is smaller."""
    margin_h = max(shape[0] - crop_size[0], 0)
    margin_w = max(shape[1] - crop_size[1], 0)
    y1 = rng.randint(0, margin_h + 1)
    x1 = rng.randint(0, margin_w + 1)
    return y1, y1 + crop_size[0], x1, x1 + crop_size[1]


def crop_is_acceptable(label_crop: np.ndarray, cat_max_ratio: float, ignore_index: int = IGNORE_INDEX) -> bool:
    """More than one non-ignored class and the most frequent one under cat_max_ratio of them."""
    labels, counts = np.unique(label_crop, return_counts=True)
    counts = counts[labels != ignore_index]
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def random_crop(img, label, crop_size, rng: np.random.RandomState, cat_max_ratio=0.75, max_tries=10,
                ignore_index=IGNORE_INDEX):
    """mmseg RandomCrop: check up to `max_tries` boxes, drawing a new one after each rejected
    box; when all are rejected the last box drawn (the (max_tries+1)-th) is used."""
    y1, y2, x1, x2 = random_crop_box(img.shape, crop_size, rng)
    if cat_max_ratio < 1.0:
        for _ in range(max_tries):
            if crop_is_acceptable(label[y1:y2, x1:x2], cat_max_ratio, ignore_index):
                break
            y1, y2, x1, x2 = random_crop_box(img.shape, crop_size, rng)
    return img[y1:y2, x1:x2], label[y1:y2, x1:x2]


def random_flip(img, label, rng: np.random.RandomState, prob=0.5):
    if rng.rand() < prob:
        return img[:, ::-1], label[:, ::-1]
    return img, label


# ---------------------------------------------------------------- HSV as cv2 computes it for uint8
HSV_SHIFT = 12
_V = np.arange(256, dtype=np.float64)
with np.errstate(divide="ignore"):
    # cv2's saturate_cast<int>(double) rounds half to even, as np.rint does; entry 0 is 0.
    SDIV_TABLE = np.where(_V > 0, np.rint((255 << HSV_SHIFT) / _V), 0).astype(np.int64)
    HDIV_TABLE_180 = np.where(_V > 0, np.rint((180 << HSV_SHIFT) / (6.0 * _V)), 0).astype(np.int64)


def rgb_to_hsv_cv2(img: np.ndarray) -> np.ndarray:
    """cv2.cvtColor(bgr, COLOR_BGR2HSV) for uint8, given the same image in RGB order:
    H in [0, 180), S and V in [0, 255], with cv2's 12-bit fixed-point division tables."""
    r, g, b = (img[..., i].astype(np.int64) for i in range(3))
    v = np.maximum(np.maximum(b, g), r)
    vmin = np.minimum(np.minimum(b, g), r)
    diff = v - vmin
    s = (diff * SDIV_TABLE[v] + (1 << (HSV_SHIFT - 1))) >> HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * HDIV_TABLE_180[diff] + (1 << (HSV_SHIFT - 1))) >> HSV_SHIFT
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], axis=-1).astype(np.uint8)


# cv2 HSV2RGB sector table: which of (v, p, q, t) becomes (b, g, r) in each 60-degree sector.
_SECTOR_BGR = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])


def _one_minus_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 1 - a*b rounded once, as the fused multiply-add cv2's SIMD code compiles to
    (a float32 product is exact in float64)."""
    return (1.0 - a.astype(np.float64) * b.astype(np.float64)).astype(np.float32)


def hsv_to_rgb_cv2(hsv: np.ndarray) -> np.ndarray:
    """cv2.cvtColor(hsv, COLOR_HSV2BGR) for uint8 (float32 arithmetic, as cv2), returned in RGB order.

    This is cv2's vectorised path (x86 SIMD with FMA), the one an image of any real width
    takes: 1 - s*h is one fused multiply-add and the scaled result is truncated. cv2's
    scalar path, which only converts a row's last few pixels, rounds instead (a 1-pixel
    image in cv2 is up to 1 grey level darker than the same pixel in a wide image)."""
    h = hsv[..., 0].astype(np.float32) * np.float32(6.0 / 180.0)
    s = hsv[..., 1].astype(np.float32) * np.float32(1.0 / 255.0)
    v = hsv[..., 2].astype(np.float32) * np.float32(1.0 / 255.0)
    h = np.fmod(h, np.float32(6.0))
    sector = np.floor(h).astype(np.int64)
    h = h - sector.astype(np.float32)
    out_of_range = (sector < 0) | (sector >= 6)
    sector = np.where(out_of_range, 0, sector)
    h = np.where(out_of_range, np.float32(0.0), h)
    tab = np.stack(
        [v, v * (np.float32(1.0) - s), v * _one_minus_product(s, h), v * _one_minus_product(s, np.float32(1.0) - h)],
        axis=-1,
    )
    idx = _SECTOR_BGR[sector]  # (..., 3) indices into tab for b, g, r
    bgr = np.take_along_axis(tab, idx, axis=-1)
    gray = s == 0
    bgr = np.where(gray[..., None], v[..., None], bgr)
    rgb = bgr[..., ::-1] * np.float32(255.0)
    return np.clip(np.floor(rgb), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- PhotoMetricDistortion
@dataclass(frozen=True)
class PhotoMetricDistortion:
    """mmseg PhotoMetricDistortion with its defaults; each step fires with probability 0.5."""

    brightness_delta: int = 32
    contrast_range: tuple[float, float] = (0.5, 1.5)
    saturation_range: tuple[float, float] = (0.5, 1.5)
    hue_delta: int = 18

    @staticmethod
    def convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        out = img.astype(np.float32) * alpha + beta
        return np.clip(out, 0, 255).astype(np.uint8)

    def brightness(self, img, rng):
        if rng.randint(2):
            return self.convert(img, beta=rng.uniform(-self.brightness_delta, self.brightness_delta))
        return img

    def contrast(self, img, rng):
        if rng.randint(2):
            return self.convert(img, alpha=rng.uniform(*self.contrast_range))
        return img

    def saturation(self, img, rng):
        if rng.randint(2):
            hsv = rgb_to_hsv_cv2(img)
            hsv[..., 1] = self.convert(hsv[..., 1], alpha=rng.uniform(*self.saturation_range))
            return hsv_to_rgb_cv2(hsv)
        return img

    def hue(self, img, rng):
        if rng.randint(2):
            hsv = rgb_to_hsv_cv2(img)
            hsv[..., 0] = (hsv[..., 0].astype(int) + rng.randint(-self.hue_delta, self.hue_delta)) % 180
            return hsv_to_rgb_cv2(hsv)
        return img

    def __call__(self, img: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
        img = self.brightness(img, rng)
        mode = rng.randint(2)  # 1: contrast before saturation/hue, 0: after
        if mode == 1:
            img = self.contrast(img, rng)
        img = self.saturation(img, rng)
        img = self.hue(img, rng)
        if mode == 0:
            img = self.contrast(img, rng)
        return img


# ---------------------------------------------------------------- normalise, pad, to tensor
# Every (channel, grey level) normalised as mmcv's imnormalize (cv2) rounds it: cv2.subtract in
# float32, then cv2.multiply by the float64 1 / std, rounded once to float32. (A float32 division
# by std is one ulp off in 84 of these 768 values.)
NORMALIZE_TABLE = (
    (np.arange(256, dtype=np.float32) - np.array(MEAN_RGB, np.float32)[:, None]).astype(np.float64)
    * (1 / np.array(STD_RGB, np.float64))[:, None]
).astype(np.float32)


def normalize(img: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 RGB -> float32 3xHxW, (x - mean) / std with mmseg's RGB mean/std, bit for bit
    as mmcv computes it (NORMALIZE_TABLE, looked up per channel)."""
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise TypeError(f"normalize: img must be a uint8 H x W x 3 array, got {img.dtype} of shape {img.shape}")
    out = np.empty((3,) + img.shape[:2], np.float32)
    for channel in range(3):
        np.take(NORMALIZE_TABLE[channel], img[..., channel], out=out[channel])
    return torch.from_numpy(out)


def pad_to(img: torch.Tensor, label: np.ndarray, size: tuple[int, int]):
    """Pad bottom/right to `size`: image with 0 (after normalisation), label with 255."""
    h, w = label.shape
    out_img = img.new_zeros((img.shape[0], max(size[0], h), max(size[1], w)))
    out_img[:, :h, :w] = img
    out_label = np.full((max(size[0], h), max(size[1], w)), IGNORE_INDEX, dtype=np.uint8)
    out_label[:h, :w] = label
    return out_img, out_label


@dataclass(frozen=True)
class TrainPipeline:
    """Spec §7: random rescale, RandomCrop(cat_max_ratio), flip, PhotoMetricDistortion,
    Normalize, Pad. __call__ returns (image float32 3xHxW, label int64 HxW)."""

    img_scale: tuple[int, int] = (2048, 1024)  # (w, h) as mmseg writes it
    ratio_range: tuple[float, float] = (0.5, 2.0)
    crop_size: tuple[int, int] = (1024, 1024)  # (h, w)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: PhotoMetricDistortion | None = PhotoMetricDistortion()  # None: skip (demo recipe only)

    def __call__(self, img: np.ndarray, label: np.ndarray, rng: np.random.RandomState):
        img, label = random_rescale(img, label, rng, self.img_scale, self.ratio_range)
        img, label = random_crop(img, label, self.crop_size, rng, self.cat_max_ratio)
        img, label = random_flip(img, label, rng, self.flip_prob)
        if self.photometric is not None:
            img = self.photometric(np.ascontiguousarray(img), rng)
        tensor, label = pad_to(normalize(img), np.ascontiguousarray(label), self.crop_size)
        return tensor, torch.from_numpy(label.astype(np.int64))


@dataclass(frozen=True)
class TestPipeline:
    """Spec §5: Resize(img_scale, keep_ratio=True) (identity for 2048x1024 Cityscapes), Normalize.
    Returns (image float32 3xhxw at the network input size, label int64 HxW at original size)."""

    img_scale: tuple[int, int] = (2048, 1024)

    def __call__(self, img: np.ndarray, label: np.ndarray, rng: np.random.RandomState | None = None):
        return normalize(imrescale(img, self.img_scale)), torch.from_numpy(label.astype(np.int64))
