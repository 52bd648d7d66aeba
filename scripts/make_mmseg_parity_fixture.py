"""Write tests/data/mmseg_parity.npz: what mmsegmentation's BiSeNetV2 computes on fixed
weights and inputs, for tests/test_mmseg_parity.py (which runs without mmseg).

Run it in a separate environment that has mmsegmentation 1.x, mmengine and mmcv-lite
(see tests/data/README.md), from the repository root:

    python scripts/make_mmseg_parity_fixture.py [--configs PATH] [--out PATH]

mmcv-lite has no compiled ops, yet mmseg.utils imports mmcv.ops.point_sample at import
time; a placeholder mmcv.ops module whose every attribute raises when called stands in
for it (none of mmcv.ops is used by BiSeNetV2, FCNHead or the CE loss).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import types

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from parity_weights import IGNORE_INDEX, INPUT_SEED, WEIGHT_SEED, make_inputs, make_state_dict  # noqa: E402

CONFIG_KEY = ("v1_2_2", "configs/bisenetv2/bisenetv2_fcn_4xb4-160k_cityscapes-1024x1024.py")
# (name, input shape, stride of the stored subsample of the full-size logits)
CASES = (("batch2", (2, 3, 64, 96), 4), ("odd", (1, 3, 67, 101), 2))
# (name, OHEMPixelSampler thresh, min_kept), each reaching another branch of the sampler:
# plain CE; the configs' thresh 0.7 with a small budget (threshold stays 0.7 and drops the
# pixels predicted with p >= 0.7); a tiny thresh whose budget-th smallest probability
# (min_kept * N, about 40% of the valid pixels here) becomes the threshold; and a
# budget over the valid pixel count (threshold = the largest probability).
SAMPLERS = (("ce", None, None), ("ohem", 0.7, 100), ("ohem_kth", 1e-6, 2200), ("ohem_all", 0.7, 40000))
LOSS_KEYS = ("decode.loss_ce", "aux_0.loss_ce", "aux_1.loss_ce", "aux_2.loss_ce", "aux_3.loss_ce")
# Parameters whose gradients of the summed eval-mode loss are stored (small ones, spread
# over the network: first conv, GE/CE/BGA blocks, every head).
GRAD_KEYS = (
    "backbone.detail.detail_branch.0.0.conv.weight",
    "backbone.semantic.stage1.conv_first.bn.weight",
    "backbone.semantic.stage2.0.dwconv.0.bn.bias",
    "backbone.semantic.stage4_CEBlock.gap.1.weight",
    "backbone.bga.detail_dwconv.0.pointwise_conv.conv.bias",
    "backbone.bga.semantic_dwconv.0.pointwise_conv.conv.bias",
    "backbone.bga.conv.bn.weight",
    "decode_head.conv_seg.bias",
    "auxiliary_head.0.conv_seg.bias",
    "auxiliary_head.1.conv_seg.bias",
    "auxiliary_head.2.conv_seg.bias",
    "auxiliary_head.3.conv_seg.bias",
)


def install_mmcv_ops_placeholder() -> None:
    try:
        import mmcv.ops  # noqa: F401  (full mmcv: the real module)
        return
    except (ImportError, ModuleNotFoundError):
        pass
    placeholder = types.ModuleType("mmcv.ops")

    def missing(name):
        def call(*args, **kwargs):
            raise NotImplementedError(f"mmcv.ops.{name}: placeholder, mmcv-lite has no compiled ops")

        return call

    def getattr_(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return missing(name)

    placeholder.__getattr__ = getattr_
    sys.modules["mmcv.ops"] = placeholder
    import mmcv

    mmcv.ops = placeholder


def build_mmseg_model(configs_path: str, dropout_ratio: float | None = None):
    """mmseg's EncoderDecoder from the resolved 4x4 config, SyncBN replaced by BN (CPU)."""
    from mmengine.config import ConfigDict
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules()
    with open(configs_path) as f:
        cfg = json.load(f)[CONFIG_KEY[0]][CONFIG_KEY[1]]["model"]
    cfg = json.loads(json.dumps(cfg).replace('"SyncBN"', '"BN"'))
    if dropout_ratio is not None:
        for head in [cfg["decode_head"], *cfg["auxiliary_head"]]:
            head["dropout_ratio"] = dropout_ratio
    return MODELS.build(ConfigDict(cfg))  # ConfigDict: inference() reads test_cfg.mode


def data_samples(labels: torch.Tensor):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    samples = []
    for label in labels:
        height, width = label.shape
        sample = SegDataSample()
        sample.gt_sem_seg = PixelData(data=label[None])
        sample.set_metainfo(dict(img_shape=(height, width), ori_shape=(height, width), pad_shape=(height, width)))
        samples.append(sample)
    return samples


def set_samplers(model, thresh, min_kept) -> None:
    from mmseg.structures import build_pixel_sampler

    for head in [model.decode_head, *model.auxiliary_head]:
        head.sampler = (
            None
            if thresh is None
            else build_pixel_sampler(dict(type="OHEMPixelSampler", thresh=thresh, min_kept=min_kept), context=head)
        )


def head_losses(model, feats, samples) -> list[float]:
    """Each head's loss_by_feat (resize to label size, sampler, CE over all pixels)."""
    losses = [model.decode_head.loss_by_feat(model.decode_head(feats), samples)["loss_ce"]]
    losses += [head.loss_by_feat(head(feats), samples)["loss_ce"] for head in model.auxiliary_head]
    return [float(v) for v in losses]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=os.path.join(ROOT, "..", "shared", "reference",
                                                           "mmseg_bisenetv2_configs_resolved.json"))
    parser.add_argument("--out", default=os.path.join(ROOT, "tests", "data", "mmseg_parity.npz"))
    args = parser.parse_args()

    install_mmcv_ops_placeholder()
    import mmcv
    import mmengine
    import mmseg

    torch.set_num_threads(1)  # one fixed reduction order for the reference numbers
    out = {
        "versions": np.array(
            [f"mmsegmentation={mmseg.__version__}", f"mmengine={mmengine.__version__}",
             f"mmcv={mmcv.__version__}", f"torch={torch.__version__}", f"numpy={np.__version__}",
             f"config={CONFIG_KEY[1]} (SyncBN->BN)"]
        ),
        "seeds": np.array([WEIGHT_SEED, INPUT_SEED]),
        "loss_keys": np.array(LOSS_KEYS),
        "grad_keys": np.array(GRAD_KEYS),
        "samplers": np.array([name for name, _, _ in SAMPLERS]),
        "sampler_thresh": np.array([np.nan if t is None else t for _, t, _ in SAMPLERS], dtype=np.float64),
        "sampler_min_kept": np.array([0 if k is None else k for _, _, k in SAMPLERS], dtype=np.int64),
    }

    model = build_mmseg_model(args.configs)
    reference = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    state = make_state_dict(reference)
    model.load_state_dict(state, strict=True)
    out["state_keys"] = np.array([k for k, _ in reference])
    out["state_shapes"] = np.array(
        [list(s) + [0] * (4 - len(s)) for _, s in reference], dtype=np.int64
    )  # zero-padded to rank 4; state_ndims gives the rank
    out["state_ndims"] = np.array([len(s) for _, s in reference], dtype=np.int64)
    # Per-tensor float64 sums: tells a changed torch RNG apart from a model difference.
    out["state_sums"] = np.array([float(state[k].double().sum()) for k, _ in reference])

    model.eval()
    with torch.no_grad():
        for case, shape, stride in CASES:
            image, labels = make_inputs(shape)
            out[f"{case}/input_shape"] = np.array(shape, dtype=np.int64)
            samples = data_samples(labels)
            metas = [s.metainfo for s in samples]
            feats = model.extract_feat(image)
            for i, feat in enumerate(feats):
                out[f"{case}/backbone_{i}"] = feat.numpy()
            out[f"{case}/decode_logits"] = model.decode_head(feats).numpy()
            for i, head in enumerate(model.auxiliary_head):
                out[f"{case}/aux_{i}_logits"] = head(feats).numpy()
            final = model.inference(image, metas)
            assert final.shape[-2:] == image.shape[-2:]
            out[f"{case}/final_logits_stride"] = np.array(stride)
            out[f"{case}/final_logits_sub"] = final[..., ::stride, ::stride].numpy()
            out[f"{case}/final_logits_sum"] = np.array(final.double().sum().item())
            out[f"{case}/final_logits_abs_sum"] = np.array(final.double().abs().sum().item())
            losses = []
            for _, thresh, min_kept in SAMPLERS:
                set_samplers(model, thresh, min_kept)
                losses.append(head_losses(model, feats, samples))
            set_samplers(model, None, None)
            out[f"{case}/eval_losses"] = np.array(losses, dtype=np.float32)  # [sampler, head]

    # Gradients of the summed loss in eval mode (BN running statistics). In train mode the
    # batch statistics over this tiny batch (the CEBlock's gap BN normalizes 2 values per
    # channel) make them ill-conditioned: float32 runs, mmseg's and bisenet_fast's alike,
    # differ from a float64 run by up to 3e-2 (gradients up to 7), so train-mode gradients
    # would check float32 rounding, not the model.
    for case, shape, _ in CASES:
        image, labels = make_inputs(shape)
        grads = []
        for _, thresh, min_kept in SAMPLERS:
            set_samplers(model, thresh, min_kept)
            model.zero_grad(set_to_none=True)
            losses = model.loss(image, data_samples(labels))
            sum(losses[k] for k in LOSS_KEYS).backward()
            params = dict(model.named_parameters())
            grads.append(np.concatenate([params[k].grad.flatten().numpy() for k in GRAD_KEYS]))
        set_samplers(model, None, None)
        out[f"{case}/eval_grads"] = np.stack(grads).astype(np.float32)  # [sampler, concat(GRAD_KEYS)]

    # Train mode (BN batch statistics), dropout 0 so the losses are deterministic: the
    # losses of model.loss (plain CE and OHEM) and the BN running statistics after one
    # forward. Batch 2 only: with one image the CEBlock's gap BN has one value per channel.
    case, shape, _ = CASES[0]
    image, labels = make_inputs(shape)
    train_losses = []
    for _, thresh, min_kept in SAMPLERS:
        train_model = build_mmseg_model(args.configs, dropout_ratio=0.0)
        train_model.load_state_dict(state, strict=True)
        set_samplers(train_model, thresh, min_kept)
        train_model.train()
        with torch.no_grad():
            losses = train_model.loss(image, data_samples(labels))
        train_losses.append([losses[k].item() for k in LOSS_KEYS])
        if thresh is None:
            after = train_model.state_dict()
            for stat in ("running_mean", "running_var"):
                out[f"{case}/train_{stat}_sums"] = np.array(
                    [float(after[k].double().sum()) for k, _ in reference if k.endswith(stat)]
                )
    out[f"{case}/train_losses"] = np.array(train_losses, dtype=np.float32)  # [sampler, head]

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")
    for key, value in out.items():
        if value.dtype.kind == "f" and value.size > 1:
            print(f"  {key:36s} {str(value.shape):22s} absmax {np.abs(value).max():.4g}")
        elif value.size <= 12:
            print(f"  {key:36s} {value.tolist()}")


if __name__ == "__main__":
    main()
