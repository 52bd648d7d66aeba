"""Cityscapes in mmseg's layout (spec §8):

    <root>/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png
    <root>/gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png

labelTrainIds come from the official *_gtFine_labelIds.png through
`python -m bisenet_fast.data.convert <root>` (see convert.py).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps

from bisenet_fast.palette import CITYSCAPES_CLASSES as CLASSES

IMG_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelTrainIds.png"


def class_names(num_classes: int) -> list[str]:
    """The Cityscapes names for 19 classes, else the class ids as strings."""
    return list(CLASSES) if num_classes == len(CLASSES) else [str(i) for i in range(num_classes)]


class MissingLabelsError(FileNotFoundError):
    """Images without their labelTrainIds file."""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """uint8 HxWx3 RGB (mmseg reads BGR with cv2; see transforms.py for the channel order),
    turned upright by its EXIF orientation tag as cv2's IMREAD_COLOR does (Cityscapes' PNGs
    have none; photos from a phone often do). A 16-bit greyscale image keeps each value's high
    byte, as cv2's IMREAD_COLOR does (PIL's convert("RGB") would clip it to 255 instead)."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I;16"):
            grey = (np.array(im, dtype=np.uint16) >> 8).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=2)
        return np.array(im.convert("RGB"), dtype=np.uint8)


def read_label(path: str | os.PathLike) -> np.ndarray:
    """uint8 HxW train ids, as mmseg reads them (PIL, 'unchanged')."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P"):
            raise ValueError(f"{path}: a labelTrainIds PNG must be 8-bit single channel, got mode {im.mode}")
        return np.array(im, dtype=np.uint8)


def files_with_suffix(directory: str | os.PathLike, suffix: str) -> list[Path]:
    """The files under `directory` whose names end in `suffix`, sorted, found as mmseg lists a
    split (mmcv's scandir): symlinked directories are followed, and names starting with '.'
    (macOS's ._* AppleDouble copies) are skipped. Path.rglob does neither: it would leave out
    the images of a symlinked city directory without a word."""
    found = []
    for parent, _dirs, names in os.walk(directory, followlinks=True):
        found += [Path(parent, name) for name in names
                  if name.endswith(suffix) and not name.startswith(".") and Path(parent, name).is_file()]
    return sorted(found)


def label_path_for(root: Path, split: str, image: Path) -> Path:
    rel = image.relative_to(root / "leftImg8bit" / split)
    name = rel.name[: -len(IMG_SUFFIX)] + LABEL_SUFFIX
    return root / "gtFine" / split / rel.parent / name


def find_pairs(root: str | os.PathLike, split: str) -> list[tuple[Path, Path]]:
    """Sorted (image, label) paths; raises MissingLabelsError listing every missing label."""
    root = Path(root)
    image_dir = root / "leftImg8bit" / split
    if not image_dir.is_dir():
        raise FileNotFoundError(f"no Cityscapes images: {image_dir} is not a directory (expected the layout "
                                f"leftImg8bit/{split}/<city>/*{IMG_SUFFIX})")
    images = files_with_suffix(image_dir, IMG_SUFFIX)
    if not images:
        raise FileNotFoundError(f"no *{IMG_SUFFIX} files under {image_dir}")
    pairs = [(img, label_path_for(root, split, img)) for img in images]
    missing = [str(label) for _, label in pairs if not label.is_file()]
    if missing:
        shown = "\n  ".join(missing[:50]) + (f"\n  ... and {len(missing) - 50} more" if len(missing) > 50 else "")
        raise MissingLabelsError(
            f"{len(missing)} of {len(pairs)} images in {image_dir} have no label file:\n  {shown}\n"
            f"create *{LABEL_SUFFIX} from *_gtFine_labelIds.png with `python -m bisenet_fast.data.convert {root}`"
        )
    return pairs


class CityscapesDataset(torch.utils.data.Dataset):
    """Items are (image, label) as `pipeline(img, label, rng)` returns them, where rng is a
    numpy RandomState seeded by the sampler (dataset[(index, sample_seed)], the items of
    sampler.InfiniteShardedSampler; a plain dataset[index] seeds 0); without a pipeline, the
    raw uint8 RGB image (HxWx3 tensor) and uint8 label (HxW tensor)."""

    def __init__(self, root: str | os.PathLike, split: str, pipeline: Callable | None = None, *,
                 num_classes: int | None = None, ignore_index: int = 255):
        """With num_classes, every label read is checked to hold only class ids below it and
        ignore_index: a label of another kind (labelIds not converted) is then named with the
        converter, instead of failing later in the loss without its file."""
        self.root = Path(root)
        self.split = split
        self.pipeline = pipeline
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.pairs = find_pairs(self.root, split)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, 0)
        image_path, label_path = self.pairs[index]
        img, label = read_image(image_path), read_label(label_path)
        if img.shape[:2] != label.shape:
            raise ValueError(f"{image_path} is {img.shape[:2]} but its label {label_path} is {label.shape}")
        if self.num_classes is not None:
            self._check_label_values(label, label_path)
        if self.pipeline is None:
            return torch.from_numpy(img.copy()), torch.from_numpy(label.copy())
        return self.pipeline(img, label, np.random.RandomState(seed))

    def _check_label_values(self, label: np.ndarray, label_path: Path) -> None:
        bad = label[(label >= self.num_classes) & (label != self.ignore_index)]
        if bad.size:
            raise ValueError(
                f"{label_path}: label values must be in [0, {self.num_classes}) or {self.ignore_index}, found "
                f"{int(bad.min())} (labelIds not yet converted to trainIds? run python -m bisenet_fast.data.convert "
                f"{self.root})"
            )
