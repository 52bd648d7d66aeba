"""Segment an image as mmseg's test pipeline does (spec §5): RGB, normalise with mmseg's
mean/std, whole-image inference, logits resized back to the image size, argmax."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from bisenet_fast.palette import colorize

MEAN_RGB = (123.675, 116.28, 103.53)
STD_RGB = (58.395, 57.12, 57.375)
AUTOCAST_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def load_rgb(image) -> torch.Tensor:
    """An RGB image (path, HxWx3 uint8 array, or 3xHxW / HxWx3 uint8 tensor) as a
    float32 (3, H, W) tensor with values 0..255."""
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as img:
            image = np.asarray(img.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image array must be H x W x 3 (RGB), got shape {image.shape}")
        # One converting copy: also makes a read-only array (np.asarray of a PIL image)
        # writable, which torch.from_numpy requires.
        return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)
    if isinstance(image, torch.Tensor):
        if image.dim() == 3 and image.shape[0] == 3:
            return image.float()
        if image.dim() == 3 and image.shape[2] == 3:
            return image.permute(2, 0, 1).float()
        raise ValueError(f"image tensor must be 3 x H x W or H x W x 3 (RGB), got shape {tuple(image.shape)}")
    raise TypeError(f"image must be a path, numpy array or tensor, got {type(image).__name__}")


def normalize(rgb: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN_RGB, device=rgb.device).view(3, 1, 1)
    std = torch.tensor(STD_RGB, device=rgb.device).view(3, 1, 1)
    return (rgb - mean) / std


@torch.no_grad()
def segment(model: torch.nn.Module, image, *, device=None, autocast: str | None = None) -> np.ndarray:
    """Class ids (H, W) int64 for one RGB image, at the image's own size.

    autocast: None (float32), 'float16' or 'bfloat16' — mixed precision as mmseg's fp16
    recipe tested. The model is put in eval mode.
    """
    if autocast is not None and autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be None, 'float16' or 'bfloat16', got {autocast!r}")
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    x = normalize(load_rgb(image).to(device))[None]
    dtype = AUTOCAST_DTYPES.get(autocast, torch.float16)
    with torch.autocast(device.type, dtype=dtype, enabled=autocast is not None):
        logits = model(x)
    return logits.float().argmax(dim=1)[0].cpu().numpy()


def save_colored(class_ids: np.ndarray, path: str | os.PathLike) -> None:
    """Write (H, W) class ids as a Cityscapes-coloured PNG."""
    Image.fromarray(colorize(class_ids)).save(path)
