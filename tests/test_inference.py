"""The inference helper follows mmseg's test pipeline; the palette writes a PNG."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import bisenet_fast as bf
from bisenet_fast.inference import MEAN_RGB, STD_RGB, save_colored, segment
from bisenet_fast.palette import CITYSCAPES_PALETTE, colorize


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return bf.BiSeNetV2Segmentor().eval()


def _expected(model, rgb):
    x = torch.from_numpy(rgb).permute(2, 0, 1).float()
    x = (x - torch.tensor(MEAN_RGB).view(3, 1, 1)) / torch.tensor(STD_RGB).view(3, 1, 1)
    with torch.no_grad(), bf.backends.use("eager"):
        logits = model.decode_head(model.backbone(x[None]))
        logits = F.interpolate(logits, size=rgb.shape[:2], mode="bilinear", align_corners=False)
    return logits.argmax(1)[0].numpy()


def test_segment_array_path_and_tensor_agree_with_the_pipeline(model, tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(45, 70, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    expected = _expected(model, rgb)
    with bf.backends.use("eager"):
        from_array = segment(model, rgb)
        from_path = segment(model, tmp_path / "img.png")
        from_tensor = segment(model, torch.from_numpy(rgb).permute(2, 0, 1))
    assert from_array.shape == (45, 70)
    np.testing.assert_array_equal(from_array, expected)
    np.testing.assert_array_equal(from_path, expected)
    np.testing.assert_array_equal(from_tensor, expected)


def test_segment_autocast_bfloat16_runs_on_cpu(model):
    rgb = np.full((32, 48, 3), 100, dtype=np.uint8)
    out = segment(model, rgb, autocast="bfloat16")
    assert out.shape == (32, 48) and out.dtype == np.int64


def test_segment_rejects_bad_images_and_options(model):
    with pytest.raises(ValueError, match="H x W x 3"):
        segment(model, np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(TypeError, match="path, numpy array or tensor"):
        segment(model, [1, 2, 3])
    with pytest.raises(ValueError, match="autocast must be"):
        segment(model, np.zeros((8, 8, 3), dtype=np.uint8), autocast="int8")


def test_colorize_and_save(tmp_path):
    ids = np.array([[0, 18], [255, 13]])
    colored = colorize(ids)
    np.testing.assert_array_equal(colored[0, 0], CITYSCAPES_PALETTE[0])
    np.testing.assert_array_equal(colored[1, 0], [0, 0, 0])
    save_colored(ids, tmp_path / "pred.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "pred.png")), colored)
