"""A deterministic, street-like synthetic dataset in Cityscapes' layout (spec §8).

Each scene has sky over a row of buildings, walls and trees, a sidewalk band with fences,
terrain, poles carrying traffic lights and signs, and people, and a road with vehicles;
the bottom rows are an ignored (255) "ego vehicle" strip, as in Cityscapes. Every class is
painted in its own colour (its Cityscapes palette colour, except that the dark-blue vehicles
and the rider are moved to hues no other class uses), varied per instance and per pixel, and
with its own texture (window grid, bricks, stripes, foliage noise...), so it is learnable from
colour and texture. The same (seed, split, index) always gives the same image and label.

    python -m bisenet_fast.data.synthetic demo_out/synthetic --train 200 --val 40
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from bisenet_fast.cli_args import MAX_SEED, POSITIVE_INT, SEED
from bisenet_fast.data.cityscapes import CLASSES, IMG_SUFFIX, LABEL_SUFFIX
from bisenet_fast.palette import CITYSCAPES_PALETTE as PALETTE

IGNORE_INDEX = 255
C = {name: i for i, name in enumerate(CLASSES)}
# Cityscapes draws truck, bus, train and car in near-identical dark blues and rider next to person;
# the scenes paint them apart so that colour alone separates every class.
APPEARANCE = {i: tuple(color) for i, color in enumerate(PALETTE.tolist())} | {
    C["rider"]: (240, 240, 240), C["truck"]: (110, 40, 150), C["bus"]: (0, 150, 150), C["train"]: (140, 110, 40),
}
CITY = "synthville"


class Canvas:
    def __init__(self, height: int, width: int, rng: np.random.RandomState):
        self.rng = rng
        self.height, self.width = height, width
        self.img = np.zeros((height, width, 3), dtype=np.float32)
        self.label = np.full((height, width), IGNORE_INDEX, dtype=np.uint8)
        self.yy, self.xx = np.mgrid[0:height, 0:width]

    def paint(self, cls: int, y0: int, y1: int, x0: int, x1: int, mask: np.ndarray | None = None) -> None:
        """Fill a box (optionally a mask inside it) with class `cls`'s coloured texture."""
        y0, y1 = max(0, int(y0)), min(self.height, int(y1))
        x0, x1 = max(0, int(x0)), min(self.width, int(x1))
        if y1 <= y0 or x1 <= x0:
            return
        region = np.ones((y1 - y0, x1 - x0), dtype=bool) if mask is None else mask[: y1 - y0, : x1 - x0]
        colour = np.array(APPEARANCE[cls], dtype=np.float32) * self.rng.uniform(0.9, 1.1)
        shade = texture(cls, self.yy[y0:y1, x0:x1] - y0, self.xx[y0:y1, x0:x1] - x0, self.rng)
        patch = colour[None, None, :] * shade[..., None] + self.rng.normal(0, 4, (y1 - y0, x1 - x0, 1))
        self.img[y0:y1, x0:x1][region] = patch[region]
        self.label[y0:y1, x0:x1][region] = cls


def texture(cls: int, y: np.ndarray, x: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """A multiplicative shading pattern (about 1) characteristic of the class."""
    name = CLASSES[cls]
    if name == "building":  # window grid
        return np.where((y % 8 < 4) & (x % 8 < 4), 0.7, 1.0)
    if name == "wall":  # brick courses
        return np.where(y % 6 == 0, 0.75, 1.0)
    if name == "fence":  # vertical slats
        return np.where(x % 4 < 2, 0.8, 1.1)
    if name == "sidewalk":  # paving grid
        return np.where((y % 10 == 0) | (x % 10 == 0), 0.8, 1.0)
    if name in ("vegetation", "terrain"):  # foliage / grass noise
        return 1.0 + rng.uniform(-0.25, 0.25, y.shape)
    if name == "sky":  # smooth vertical gradient
        return 0.9 + 0.25 * y / max(1, y.max())
    if name == "bus":  # band of windows
        return np.where((y > 4) & (y < 12) & (x % 10 < 7), 0.6, 1.0)
    if name == "train":  # long vertical panels
        return np.where(x % 14 < 2, 0.6, 1.0)
    if name in ("car", "truck"):  # darker lower half (wheels, bumper)
        return np.where(y > 0.6 * y.max(), 0.7, 1.0)
    if name == "road":  # lane markings
        return np.where((y % 16 < 2) & (x % 32 < 16), 1.3, 1.0)
    return np.ones(y.shape, dtype=np.float32)


def draw_scene(height: int, width: int, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    cv = Canvas(height, width, rng)
    u = lambda lo, hi: int(rng.uniform(lo, hi))  # noqa: E731
    horizon = u(0.4 * height, 0.5 * height)
    sidewalk_bottom = horizon + u(0.12 * height, 0.2 * height)
    ego_top = height - u(0.04 * height, 0.08 * height)

    cv.paint(C["sky"], 0, horizon, 0, width)
    x = 0
    while x < width:  # skyline: buildings, walls, trees
        # At least a pixel: below ~7 pixels of width the draw rounds to 0, and the loop never ended.
        w = max(1, u(0.15 * width, 0.35 * width))
        kind = rng.choice(["building", "building", "wall", "vegetation"])
        top = {"building": u(0.05 * height, 0.25 * height), "wall": horizon - u(0.1 * height, 0.18 * height),
               "vegetation": u(0.1 * height, 0.3 * height)}[kind]
        if kind == "vegetation":  # an elliptic tree crown standing on the horizon
            cy, cx = (top + horizon) / 2, x + w / 2
            mask = ((cv.yy - cy) ** 2 / ((horizon - top) / 2 + 1) ** 2 + (cv.xx - cx) ** 2 / (w / 2 + 1) ** 2) <= 1.0
            cv.paint(C["vegetation"], 0, height, 0, width, mask & (cv.yy < horizon))
        else:
            cv.paint(C[kind], top, horizon, x, x + w)
        x += w
    cv.paint(C["sidewalk"], horizon, sidewalk_bottom, 0, width)
    cv.paint(C["road"], sidewalk_bottom, ego_top, 0, width)
    if rng.rand() < 0.7:  # grass verge
        x0 = u(0, 0.6 * width)
        cv.paint(C["terrain"], horizon, sidewalk_bottom - 2, x0, x0 + u(0.15 * width, 0.3 * width))
    if rng.rand() < 0.6:  # fence along the sidewalk
        x0 = u(0, 0.6 * width)
        cv.paint(C["fence"], horizon - u(0.08 * height, 0.12 * height), horizon + 4, x0, x0 + u(0.15 * width, 0.3 * width))

    for _ in range(rng.randint(1, 4)):  # poles with a light or a sign
        px = u(0, width - 10)
        top = u(0.12 * height, 0.3 * height)
        cv.paint(C["pole"], top, sidewalk_bottom - 2, px, px + u(8, 11))
        if rng.rand() < 0.5:
            cv.paint(C["traffic light"], top - 22, top + 2, px - 4, px + 12)
        else:
            cv.paint(C["traffic sign"], top - 18, top + 2, px - 6, px + 14)
    for _ in range(rng.randint(0, 4)):  # pedestrians on the sidewalk
        px, h = u(0, width - 10), u(0.2 * height, 0.3 * height)
        cv.paint(C["person"], sidewalk_bottom - h, sidewalk_bottom, px, px + u(9, 13))

    vehicles = {"car": (0.28, 0.16), "truck": (0.35, 0.24), "bus": (0.45, 0.28), "train": (0.6, 0.26),
                "motorcycle": (0.14, 0.16), "bicycle": (0.14, 0.16)}
    lane_y = sidewalk_bottom + u(0.22 * height, 0.3 * height)
    for name in rng.choice(list(vehicles), size=rng.randint(1, 4), replace=False):
        rw, rh = vehicles[name]
        w, h = int(rw * width * rng.uniform(0.85, 1.15)), int(rh * height * rng.uniform(0.85, 1.15))
        x0 = u(-0.1 * width, width - 0.9 * w)
        bottom = min(ego_top, lane_y + u(-0.05 * height, 0.05 * height))
        cv.paint(C[name], bottom - h, bottom, x0, x0 + w)
        if name in ("motorcycle", "bicycle") and rng.rand() < 0.7:
            cv.paint(C["rider"], bottom - h - u(0.12 * height, 0.18 * height), bottom - h + 3, x0 + 2, x0 + w - 2)
    cv.paint(C["road"], ego_top, height, 0, width)  # bonnet: dark, ignored
    cv.img[ego_top:] = 20.0 + rng.normal(0, 3, (height - ego_top, width, 1))
    cv.label[ego_top:] = IGNORE_INDEX
    return np.clip(np.rint(cv.img), 0, 255).astype(np.uint8), cv.label


def scene(seed: int, split: str, index: int, height: int = 128, width: int = 256):
    """(image uint8 HxWx3 RGB, label uint8 HxW) of one scene; deterministic in its arguments."""
    split_id = {"train": 0, "val": 1, "test": 2}[split]
    rng = np.random.RandomState([seed, split_id, index])
    return draw_scene(height, width, rng)


def generate(root: str | Path, num_train: int = 200, num_val: int = 40, height: int = 128, width: int = 256,
             seed: int = 0) -> Path:
    """Write the dataset under `root` (leftImg8bit/ and gtFine/, split/synthville/...)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an int in [0, {MAX_SEED}], got {seed!r}")
    root = Path(root)
    for split, count in (("train", num_train), ("val", num_val)):
        img_dir = root / "leftImg8bit" / split / CITY
        label_dir = root / "gtFine" / split / CITY
        img_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img, label = scene(seed, split, i, height, width)
            stem = f"{CITY}_{i:06d}_000019"
            Image.fromarray(img, mode="RGB").save(img_dir / f"{stem}{IMG_SUFFIX}")
            Image.fromarray(label, mode="L").save(label_dir / f"{stem}{LABEL_SUFFIX}")
    return root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root")
    parser.add_argument("--train", type=POSITIVE_INT, default=200)
    parser.add_argument("--val", type=POSITIVE_INT, default=40)
    parser.add_argument("--height", type=POSITIVE_INT, default=128)
    parser.add_argument("--width", type=POSITIVE_INT, default=256)
    parser.add_argument("--seed", type=SEED, default=0)
    args = parser.parse_args(argv)
    generate(args.root, args.train, args.val, args.height, args.width, args.seed)
    print(f"wrote {args.train} train and {args.val} val scenes under {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
