"""Write tests/data/cv2_resize.npz: what cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
returns for seeded random uint8 RGB images, for tests/test_data.py, which checks
bisenet_fast.data.transforms.resize_bilinear_uint8 against it bit for bit without OpenCV.

The project does not depend on OpenCV; run this where cv2 and numpy are importable (see
tests/data/README.md), from the repository root:

    python scripts/make_cv2_resize_fixture.py [--out PATH]

It does not import bisenet_fast: the sizes below are written out, with where each comes from.
"""
from __future__ import annotations

import argparse
import os
import platform

import cv2
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 20240607
# (source (H, W), output (h, w), why). The output width in pixels is a multiple of 16 in some
# cases and not in others, so that rows whose length (w * 3 values) is not a whole number of
# SIMD vectors are covered (cv2 computes a row's last values in scalar code, with the same
# formula as its vector lanes).
CASES = (
    ((24, 40), (47, 79), "upscale x1.96, odd sizes"),
    ((16, 32), (32, 64), "upscale x2 exactly, width a multiple of 16"),
    ((48, 96), (29, 58), "downscale x0.6, non-integer"),
    ((32, 64), (16, 32), "exact x0.5: cv2 switches INTER_LINEAR to its INTER_AREA path"),
    ((40, 80), (10, 20), "exact x0.25: stays INTER_LINEAR (samples, does not average)"),
    # mmseg Resize(img_scale=(64, 32) stand-in for (2048, 1024), ratio 1.37): scale (87, 43),
    # imrescale factor min(87 / 64, 43 / 32) = 1.34375, size int(x * f + 0.5)
    ((32, 64), (43, 86), "random rescale with keep-ratio rounding"),
    # the multi-scale test ratio 1.75 on a 24x48 frame: scale (84, 42) -> (42, 84)
    ((24, 48), (42, 84), "test-time ratio 1.75"),
    ((37, 53), (20, 27), "downscale, odd sizes both ways"),
    ((30, 50), (30, 83), "height unchanged, width upscaled"),
    ((3, 5), (17, 16), "tiny source, edge clamping dominates, width 16"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "tests", "data", "cv2_resize.npz"))
    args = parser.parse_args()
    rng = np.random.RandomState(SEED)
    arrays = {}
    for i, ((src_h, src_w), (h, w), _why) in enumerate(CASES):
        img = rng.randint(0, 256, (src_h, src_w, 3)).astype(np.uint8)
        arrays[f"src_{i}"] = img
        arrays[f"dst_{i}"] = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
        assert arrays[f"dst_{i}"].shape == (h, w, 3)
    arrays["versions"] = np.array([f"opencv-python-headless (cv2) {cv2.__version__}", f"numpy {np.__version__}",
                                   f"Python {platform.python_version()}", f"{platform.machine()} {platform.system()}"])
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes): {len(CASES)} cases, cv2 {cv2.__version__}")


if __name__ == "__main__":
    main()
