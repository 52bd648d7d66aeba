"""Loading mmsegmentation checkpoints without unpickling arbitrary objects."""
from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping

import torch
from torch import nn

from bisenet_fast.models.bisenetv2 import BiSeNetV2


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's keys or shapes do not match the model."""


# What torch.load raises for a file that is not a checkpoint (text or random bytes: KeyError
# from the legacy unpickler) or a truncated or damaged one. A missing file stays
# FileNotFoundError.
CORRUPT_FILE_ERRORS = (KeyError, EOFError, RuntimeError, ValueError, zipfile.BadZipFile)


def read_checkpoint(path: str | os.PathLike) -> Mapping:
    """torch.load with weights_only=True: tensors, plain containers, numbers and strings only."""
    if not os.path.isfile(path):
        why = "is a directory, not a checkpoint file" if os.path.isdir(path) else "does not exist"
        raise FileNotFoundError(f"checkpoint {os.fspath(path)!r} {why}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise pickle.UnpicklingError(
            f"refusing to load {os.fspath(path)!r}: it holds objects other than tensors, plain containers, "
            f"numbers and strings, and loading it would run code from the file ({err})"
        ) from None
    except CORRUPT_FILE_ERRORS as err:
        raise ValueError(
            f"cannot read {os.fspath(path)!r}: it is not a torch checkpoint, or it is truncated or corrupt "
            f"({type(err).__name__}: {err})"
        ) from None


def extract_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The weights of an mmseg .pth ({'meta', 'state_dict', ...}) or of a bare state_dict,
    with a DDP 'module.' prefix removed."""
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"a checkpoint must be a mapping, got {type(checkpoint).__name__}")
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        raise TypeError(f"checkpoint['state_dict'] must be a mapping, got {type(state).__name__}")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"state_dict entries must map str to Tensor; offending keys: {bad[:5]}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def load_mmseg_checkpoint(
    model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping, strict: bool = True
) -> dict[str, list[str]]:
    """Load mmseg BiSeNetV2 weights into `model`.

    Accepts a path to an mmseg .pth, a loaded checkpoint dict, or a bare state_dict
    (optionally 'module.'-prefixed). For a bare `BiSeNetV2` backbone, the 'backbone.'
    entries of a full segmentor checkpoint are taken (backbone-only loading). With
    strict=True any missing, unexpected or wrong-shaped key raises CheckpointMismatchError
    listing them; with strict=False matching entries load and the report is returned as
    {'missing': [...], 'unexpected': [...], 'shape_mismatch': [...]}.
    """
    checkpoint = path_or_state_dict
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        checkpoint = read_checkpoint(path_or_state_dict)
    state = extract_state_dict(checkpoint)
    if isinstance(model, BiSeNetV2) and any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}

    own = model.state_dict()
    report = {
        "missing": [k for k in own if k not in state],
        "unexpected": [k for k in state if k not in own],
        "shape_mismatch": [
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            for k in own
            if k in state and state[k].shape != own[k].shape
        ],
    }
    if strict and any(report.values()):
        lines = [f"checkpoint does not match {type(model).__name__}:"]
        for kind, keys in report.items():
            if keys:
                shown = "\n    ".join(keys[:20]) + (f"\n    ... and {len(keys) - 20} more" if len(keys) > 20 else "")
                lines.append(f"  {kind} ({len(keys)}):\n    {shown}")
        raise CheckpointMismatchError("\n".join(lines))
    loadable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(loadable, strict=strict)
    return report
