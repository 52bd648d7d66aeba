"""The inference helper follows mmseg's test pipeline; the palette writes a PNG."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import bisenet_fast as bf
from bisenet_fast.data.transforms import imrescale, normalize
from bisenet_fast.inference import load_rgb, predict_probs, save_colored, segment
from bisenet_fast.palette import CITYSCAPES_PALETTE, colorize

SMALL_SCALE = (140, 90)  # (w, h): a 45x70 image is doubled to 90x140


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return bf.BiSeNetV2Segmentor().eval()


def _expected(model, rgb, img_scale):
    x = normalize(imrescale(rgb, img_scale))[None]
    with torch.no_grad(), bf.backends.use("eager"):
        logits = model.decode_head(model.backbone(x))
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        logits = F.interpolate(logits, size=rgb.shape[:2], mode="bilinear", align_corners=False)
    return logits.argmax(1)[0].numpy()


def test_segment_array_path_and_tensor_agree_with_the_pipeline(model, tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(45, 70, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    expected = _expected(model, rgb, SMALL_SCALE)
    with bf.backends.use("eager"):
        from_array = segment(model, rgb, img_scale=SMALL_SCALE)
        from_path = segment(model, tmp_path / "img.png", img_scale=SMALL_SCALE)
        from_tensor = segment(model, torch.from_numpy(rgb).permute(2, 0, 1), img_scale=SMALL_SCALE)
    assert from_array.shape == (45, 70)
    np.testing.assert_array_equal(from_array, expected)
    np.testing.assert_array_equal(from_path, expected)
    np.testing.assert_array_equal(from_tensor, expected)


def test_segment_rescales_into_mmseg_test_scale_and_answers_at_the_image_size():
    sizes = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            sizes.append(tuple(x.shape[-2:]))
            return self.conv(x)

    out = segment(Recorder(), np.zeros((480, 640, 3), dtype=np.uint8))
    assert sizes == [(1024, 1365)]  # mmcv.imrescale into (2048, 1024), aspect ratio kept
    assert out.shape == (480, 640)


def test_segment_runs_a_fused_model_without_a_device_argument(model):
    rgb = np.random.default_rng(1).integers(0, 256, size=(45, 70, 3), dtype=np.uint8)
    fused = segment(model.fuse(), rgb, img_scale=SMALL_SCALE)  # buffers only: no parameters to ask
    assert fused.shape == (45, 70)
    assert (fused == _expected(model, rgb, SMALL_SCALE)).mean() > 0.99  # float rounding may flip near-ties


def test_segment_refuses_autocast_for_a_fused_model(model):
    """A fused model computes in the dtype it was fused to: autocast would be silently ignored."""
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"fuse\(dtype=torch.bfloat16\) gives a bfloat16 model"):
        segment(model.fuse(), rgb, autocast="bfloat16", img_scale=SMALL_SCALE)


def test_images_are_read_upright_by_their_exif_orientation(tmp_path):
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    Image.fromarray(rgb).save(tmp_path / "rotated.png", exif=exif)
    upright = load_rgb(tmp_path / "rotated.png")
    np.testing.assert_array_equal(upright, np.rot90(rgb, k=-1))


def test_a_16_bit_grey_image_is_read_by_its_high_byte_as_cv2_reads_it(tmp_path):
    grey = np.array([[0, 255, 256, 40000], [65535, 1000, 20000, 511]], dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "grey16.png")  # mode I;16, not clipped to 255
    rgb = load_rgb(tmp_path / "grey16.png")
    np.testing.assert_array_equal(rgb, np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, axis=2))


@pytest.mark.parametrize("amp_dtype, fuse, match", [
    (torch.bfloat16, True, r"amp_dtype=torch.bfloat16 does not apply to a fuse\(\)d model"),
    (torch.int8, False, "amp_dtype must be None, torch.float16 or torch.bfloat16, got torch.int8"),
    ("float16", False, "amp_dtype must be None, torch.float16 or torch.bfloat16, got 'float16'"),
])
def test_predict_probs_refuses_an_autocast_dtype_that_would_not_apply(model, amp_dtype, fuse, match):
    # a fused model ignored autocast, and CPU autocast disables itself for int8 with a warning
    with pytest.raises(ValueError, match=match):
        predict_probs(model.fuse() if fuse else model, np.zeros((8, 8, 3), dtype=np.uint8), img_scale=SMALL_SCALE,
                      amp_dtype=amp_dtype)


def test_segment_autocast_bfloat16_runs_on_cpu(model):
    rgb = np.full((32, 48, 3), 100, dtype=np.uint8)
    out = segment(model, rgb, autocast="bfloat16", img_scale=(48, 32))
    assert out.shape == (32, 48) and out.dtype == np.int64


def test_segment_rejects_bad_images_and_options(model):
    with pytest.raises(ValueError, match="H x W x 3"):
        segment(model, np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(TypeError, match="path, numpy array or tensor"):
        segment(model, [1, 2, 3])
    with pytest.raises(TypeError, match="image array must be uint8"):
        segment(model, np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="image tensor must be uint8"):
        segment(model, torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="autocast must be"):
        segment(model, np.zeros((8, 8, 3), dtype=np.uint8), autocast="int8")
    with pytest.raises(ValueError, match="image must be non-empty, got 0 x 8 pixels"):
        segment(model, np.zeros((0, 8, 3), dtype=np.uint8))


@pytest.mark.parametrize("options, match", [
    (dict(img_scale=(0, 0)), "img_scale must be two positive ints \\(w, h\\), got \\(0, 0\\)"),
    (dict(img_scale=(-5, 64)), "img_scale must be two positive ints"),
    (dict(img_scale=(96,)), "img_scale must be two positive ints"),
    (dict(img_scale=(96.0, 64)), "img_scale must be two positive ints"),
    (dict(ratios=()), "ratios must be one or more positive finite numbers, got \\[\\]"),
    (dict(ratios=(1.0, -0.5)), "ratios must be one or more positive finite numbers"),
    (dict(ratios=(float("inf"),)), "ratios must be one or more positive finite numbers, got \\[inf\\]"),
    (dict(ratios=1.0), "ratios must be one or more positive finite numbers, got 1.0"),
    (dict(img_scale=(96, 64), ratios=(0.01,)), "img_scale \\(96, 64\\) times ratio 0.01 is \\(0, 0\\): an empty image"),
])
def test_predict_probs_names_a_bad_test_scale(model, options, match):
    with pytest.raises(ValueError, match=match):
        predict_probs(model, np.zeros((8, 8, 3), dtype=np.uint8), **options)


@pytest.mark.parametrize("shape", [(1, 500, 3), (500, 1, 3)])
def test_predict_probs_names_a_thin_image_that_rescales_to_nothing(model, shape):
    # 500 pixels long into (140, 90): a factor of 0.18, so the one-pixel side rounds to 0
    with pytest.raises(ValueError, match=r"a \d+ x \d+ image rescaled into the test scale \(140, 90\) .* empty"):
        predict_probs(model, np.zeros(shape, dtype=np.uint8), img_scale=SMALL_SCALE)


def test_colorize_and_save(tmp_path):
    ids = np.array([[0, 18], [255, 13]])
    colored = colorize(ids)
    np.testing.assert_array_equal(colored[0, 0], CITYSCAPES_PALETTE[0])
    np.testing.assert_array_equal(colored[1, 0], [0, 0, 0])
    save_colored(ids, tmp_path / "pred.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "pred.png")), colored)
