"""The bundled recipes hold mmseg's settings: every value a recipe carries is compared with
the resolved 0.x config of the same name (tests/data/mmseg_reference, from ../shared)."""
import json
import os
from pathlib import Path

import pytest

from bisenet_fast.configs import load_recipe
from bisenet_fast.data import transforms as T
from tests.helpers import MMSEG_REFERENCE

PUBLISHED = [
    "bisenetv2_fcn_4x4_1024x1024_160k_cityscapes",
    "bisenetv2_fcn_4x8_1024x1024_160k_cityscapes",
    "bisenetv2_fcn_fp16_4x4_1024x1024_160k_cityscapes",
    "bisenetv2_fcn_ohem_4x4_1024x1024_160k_cityscapes",
]
CONTRACT = Path(__file__).resolve().parents[2] / "shared" / "reference"


def resolved_config(name):
    with open(os.path.join(MMSEG_REFERENCE, "mmseg_bisenetv2_configs_resolved.json")) as f:
        return json.load(f)["v0_30_0"][f"configs/bisenetv2/{name}.py"]


def train_step(config, kind):
    steps = [s for s in config["data"]["train"]["pipeline"] if s["type"] == kind]
    return steps[0] if steps else None


@pytest.mark.parametrize("name", PUBLISHED)
def test_recipe_holds_the_resolved_config(name):
    recipe, config = load_recipe(name), resolved_config(name)
    data, train = recipe["data"], config["data"]
    resize, crop = train_step(config, "Resize"), train_step(config, "RandomCrop")
    assert train["train"]["pipeline"] == config["train_pipeline"]
    assert [s["type"] for s in config["train_pipeline"]][2:8] == [
        "Resize", "RandomCrop", "RandomFlip", "PhotoMetricDistortion", "Normalize", "Pad"]
    assert data["img_scale"] == resize["img_scale"] and data["ratio_range"] == resize["ratio_range"]
    assert data["crop_size"] == crop["crop_size"] == config["crop_size"]
    assert data["cat_max_ratio"] == crop["cat_max_ratio"]
    assert data["flip_prob"] == train_step(config, "RandomFlip")["prob"]
    assert data["photometric_distortion"] is (train_step(config, "PhotoMetricDistortion") is not None)
    assert data["samples_per_gpu"] == train["samples_per_gpu"]
    assert data["workers_per_gpu"] == train["workers_per_gpu"]
    assert train["train"]["img_dir"] == f"leftImg8bit/{data['train_split']}"
    assert train["val"]["img_dir"] == f"leftImg8bit/{data['val_split']}"

    heads = [config["model"]["decode_head"], *config["model"]["auxiliary_head"]]
    assert {h["num_classes"] for h in heads} == {recipe["model"]["num_classes"]}
    samplers = [h.get("sampler") for h in heads]
    assert recipe["model"]["ohem"] is (samplers[0] is not None)
    if recipe["model"]["ohem"]:  # mmseg 0.x configures OHEM in every head alike
        assert all(s == {"type": "OHEMPixelSampler", "thresh": recipe["model"]["ohem_thresh"],
                         "min_kept": recipe["model"]["ohem_min_kept"]} for s in samplers)

    assert {"type": "SGD", **recipe["optimizer"]} == config["optimizer"]
    lr = config["lr_config"]
    schedule = recipe["schedule"]
    assert (lr["policy"], lr["by_epoch"], lr["warmup"]) == ("poly", False, "linear")
    assert schedule["power"] == lr["power"] and schedule["min_lr"] == lr["min_lr"]
    assert schedule["warmup_iters"] == lr["warmup_iters"]
    assert schedule["warmup_ratio"] == lr.get("warmup_ratio", 0.1)  # mmcv's LrUpdaterHook default
    assert schedule["max_iters"] == config["runner"]["max_iters"]
    assert config["runner"]["type"] == "IterBasedRunner"

    hook = config["optimizer_config"]
    if recipe["amp"]:
        assert recipe["amp"] == {"dtype": "float16", "loss_scale": hook["loss_scale"],
                                 "eval_autocast": "fp16" in config}  # mmseg 0.x wraps the model for fp16 if set
        assert hook["type"] == "Fp16OptimizerHook"
    else:
        assert hook == {} and "fp16" not in config

    assert recipe["eval_interval"] == config["evaluation"]["interval"]
    assert recipe["checkpoint_interval"] == config["checkpoint_config"]["interval"]
    assert recipe["log_interval"] == config["log_config"]["interval"]
    assert recipe["gpus"] == 4  # the 4x in every name: what samples_per_gpu is per

    aug = config["test_pipeline"][1]
    assert aug["type"] == "MultiScaleFlipAug" and recipe["test"]["img_scale"] == aug["img_scale"]
    # tools/test.py --aug-test (spec §5): not part of the config.
    assert recipe["test"]["aug_ratios"] == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75] and recipe["test"]["aug_flip"]


@pytest.mark.parametrize("name", PUBLISHED)
def test_normalisation_and_padding_are_the_configs(name):
    config = resolved_config(name)
    norm, pad = train_step(config, "Normalize"), train_step(config, "Pad")
    assert norm["to_rgb"] and list(T.MEAN_RGB) == norm["mean"] and list(T.STD_RGB) == norm["std"]
    assert pad["size"] == config["crop_size"] and (pad["pad_val"], pad["seg_pad_val"]) == (0, 255)


@pytest.mark.parametrize("file", ["mmseg_bisenetv2_configs_resolved.json", "mmseg_bisenetv2_state_dict.json"])
def test_copies_equal_the_contract(file):
    if not (CONTRACT / file).exists():
        pytest.skip(f"{CONTRACT} not found (the contract lives in ../shared beside the checkout)")
    assert (Path(MMSEG_REFERENCE) / file).read_bytes() == (CONTRACT / file).read_bytes()
