"""labelIds -> labelTrainIds for Cityscapes (spec §8).

mmseg's converter rasterises *_gtFine_polygons.json with cityscapesscripts; remapping the
official *_gtFine_labelIds.png through the id -> trainId table gives the same image
(license plates are skipped in both encodings), and needs no extra package:

    python -m bisenet_fast.data.convert data/cityscapes [--workers 4]
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from bisenet_fast.cli_args import POSITIVE_INT
from bisenet_fast.data.cityscapes import LABEL_SUFFIX, files_with_suffix

LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
# Cityscapes id -> trainId; every id not listed (0-6, 9, 10, 14-16, 18, 29, 30, -1) is 255.
ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}


def lookup_table() -> np.ndarray:
    table = np.full(256, 255, dtype=np.uint8)
    for label_id, train_id in ID_TO_TRAIN_ID.items():
        table[label_id] = train_id
    return table


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    if label_ids.dtype != np.uint8:
        raise TypeError(f"labelIds must be uint8, got {label_ids.dtype}")
    return lookup_table()[label_ids]


def convert_file(src: Path) -> Path:
    dst = src.with_name(src.name[: -len(LABEL_IDS_SUFFIX)] + LABEL_SUFFIX)
    with Image.open(src) as im:
        # Cityscapes' labelIds are 8-bit single-channel: a cast of any other mode would wrap
        # 16-bit ids onto trainIds (263 -> 7 -> road) or fail without naming the file.
        if im.mode not in ("L", "P"):
            raise ValueError(f"{src}: labelIds must be an 8-bit single-channel PNG (mode L), got mode {im.mode}")
        train_ids = label_ids_to_train_ids(np.asarray(im))
    Image.fromarray(train_ids, mode="L").save(dst)
    return dst


def convert_tree(root: str | Path, workers: int = 4) -> int:
    sources = files_with_suffix(Path(root) / "gtFine", LABEL_IDS_SUFFIX)
    if not sources:
        raise FileNotFoundError(f"no *{LABEL_IDS_SUFFIX} under {Path(root) / 'gtFine'}")
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(convert_file, sources, chunksize=16):
            pass
    return len(sources)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="Cityscapes root holding gtFine/")
    parser.add_argument("--workers", type=POSITIVE_INT, default=4)
    args = parser.parse_args(argv)
    count = convert_tree(args.root, args.workers)
    print(f"wrote {count} *{LABEL_SUFFIX} files under {Path(args.root) / 'gtFine'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
