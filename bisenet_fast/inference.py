"""One image through mmseg's test pipeline (spec §5): RGB uint8, Resize(img_scale,
keep_ratio=True), Normalize with mmseg's mean/std, whole-image inference, logits resized to
the image's own size (bilinear, align_corners=False), softmax; optionally over several
scales and horizontal flips (aug_test), their probabilities summed. The argmax is the
prediction. evaluate.py runs this per image of a dataset."""
from __future__ import annotations

import contextlib
import itertools
import math
import numbers
import os
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bisenet_fast.data.cityscapes import read_image
from bisenet_fast.data.transforms import imrescale, normalize, rescale_size
from bisenet_fast.models.fused import FusedBiSeNetV2Segmentor
from bisenet_fast.palette import colorize

AUTOCAST_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def load_rgb(image) -> np.ndarray:
    """An RGB image (path, HxWx3 uint8 array, or 3xHxW / HxWx3 uint8 tensor; a 3x?x3 tensor
    is taken as HxWx3, the datasets' layout) as a uint8 HxWx3 array; a file is read as mmseg
    reads it (EXIF orientation applied)."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or 3 not in (image.shape[0], image.shape[2]):
            raise ValueError(f"image tensor must be 3 x H x W or H x W x 3 (RGB), got shape {tuple(image.shape)}")
        if image.dtype != torch.uint8:
            raise TypeError(f"image tensor must be uint8 (0..255), got {image.dtype}")
        image = (image.permute(1, 2, 0) if image.shape[0] == 3 and image.shape[2] != 3 else image).cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image array must be H x W x 3 (RGB), got shape {image.shape}")
        if image.dtype != np.uint8:
            raise TypeError(f"image array must be uint8 (0..255), got {image.dtype}")
        return image
    raise TypeError(f"image must be a path, numpy array or tensor, got {type(image).__name__}")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's parameters, or of its buffers (a fuse()d model has only buffers)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    raise ValueError("the model has no parameters or buffers to tell its device; pass device=")


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _test_scales(img_scale, ratios) -> list[tuple[int, int]]:
    """(w, h) of each test pass, as mmseg computes them: (int(w_s * r), int(h_s * r))."""
    if (not isinstance(img_scale, (tuple, list)) or len(img_scale) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in img_scale)):
        raise ValueError(f"img_scale must be two positive ints (w, h), got {img_scale!r}")
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Iterable):
        raise ValueError(f"ratios must be one or more positive finite numbers, got {ratios!r}")
    ratios = list(ratios)
    if not ratios or not all(isinstance(r, numbers.Real) and not isinstance(r, bool) and 0 < r < math.inf
                             for r in ratios):
        raise ValueError(f"ratios must be one or more positive finite numbers, got {ratios!r}")
    scales = [(int(img_scale[0] * r), int(img_scale[1] * r)) for r in ratios]
    for ratio, scale in zip(ratios, scales):
        if min(scale) < 1:
            raise ValueError(f"img_scale {tuple(img_scale)} times ratio {ratio} is {scale}: an empty image")
    return scales


@torch.no_grad()
def predict_probs(model, image, img_scale=(2048, 1024), ratios=(1.0,), flip=False, amp_dtype=None, device=None):
    """Summed softmax (C, H, W) at the image's size over every (ratio, flip) pass (spec §5):
    resize the uint8 image to (int(w_s*r), int(h_s*r)) keeping its aspect ratio, normalise,
    logits resized to the network input then to the original size (bilinear,
    align_corners=False), softmax in float32, un-flip. The argmax is the prediction.

    image: as load_rgb takes it; img_scale: (w, h) as mmseg writes it; amp_dtype: None,
    torch.float16 or torch.bfloat16, the autocast dtype (None for a fuse()d model, which
    computes in its own); device: where the model runs (default: its parameters' or
    buffers' device)."""
    scales = _test_scales(img_scale, ratios)
    if amp_dtype is not None and amp_dtype not in AUTOCAST_DTYPES.values():
        raise ValueError(f"amp_dtype must be None, torch.float16 or torch.bfloat16, got {amp_dtype!r}")
    if amp_dtype is not None and isinstance(model, FusedBiSeNetV2Segmentor):  # autocast would be silently ignored
        raise ValueError(
            f"amp_dtype={amp_dtype} does not apply to a fuse()d model, which computes in the dtype it was fused to "
            f"({model.dtype}); fuse(dtype={amp_dtype}) gives a model in that dtype"
        )
    device = model_device(model) if device is None else torch.device(device)
    img = load_rgb(image)
    height, width = img.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"image must be non-empty, got {height} x {width} pixels")
    for scale in scales:
        rescaled = rescale_size(height, width, scale)
        if min(rescaled) < 1:  # a thin image: its short side rounds to no pixels
            raise ValueError(f"a {height} x {width} image rescaled into the test scale {scale} (w, h) keeping its "
                             f"aspect ratio is {rescaled[0]} x {rescaled[1]} pixels: an empty image")
    total = None
    for scale in scales:
        x = normalize(imrescale(img, scale))[None].to(device)
        for flipped in ((False, True) if flip else (False,)):
            inp = x.flip(-1) if flipped else x
            with _autocast(device, amp_dtype):
                logits = model(inp)
            logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)
            probs = logits.softmax(dim=1)[0]
            if flipped:
                probs = probs.flip(-1)
            total = probs if total is None else total + probs
    return total


def segment(model: torch.nn.Module, image, *, device=None, autocast: str | None = None,
            img_scale: tuple[int, int] = (2048, 1024)) -> np.ndarray:
    """Class ids (H, W) int64 for one RGB image, at the image's own size, through mmseg's
    single-scale test pipeline (the network sees the image rescaled into img_scale, (w, h),
    keeping its aspect ratio: Cityscapes' 2048x1024 frames unchanged).

    autocast: None (float32), 'float16' or 'bfloat16' — mixed precision as mmseg's fp16
    recipe tested. The model is put in eval mode; a fuse()d model works too, in the dtype it
    was fused to (autocast must then be None).
    """
    if autocast is not None and autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be None, 'float16' or 'bfloat16', got {autocast!r}")
    if autocast is not None and isinstance(model, FusedBiSeNetV2Segmentor):
        raise ValueError(
            f"autocast={autocast!r} does not apply to a fuse()d model, which computes in the dtype it was fused to "
            f"({model.dtype}); fuse(dtype=torch.{autocast}) gives a {autocast} model"
        )
    model.eval()
    probs = predict_probs(model, image, img_scale, amp_dtype=AUTOCAST_DTYPES.get(autocast), device=device)
    return probs.argmax(dim=0).cpu().numpy()


def save_colored(class_ids: np.ndarray, path: str | os.PathLike) -> None:
    """Write (H, W) class ids as a Cityscapes-coloured PNG."""
    Image.fromarray(colorize(class_ids)).save(path)
