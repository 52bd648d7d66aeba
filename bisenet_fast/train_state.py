"""Training checkpoints: written atomically, read safely, holding everything an exact resume needs.

A checkpoint is {'meta', 'state_dict', 'optimizer', 'scaler', 'iteration', 'rng', 'sampler',
'log_window', 'eval_pending'}.
'state_dict' has mmseg's keys, so `load_mmseg_checkpoint` reads it as well. 'rng' holds one
entry per rank (python, numpy, torch CPU generator states, and the CUDA generator state of the
rank's own device: a resume may see fewer GPUs than the run that saved it); 'log_window' one
per rank too (the losses summed since the last log line). Everything is tensors, plain
containers, numbers and strings, so it loads with torch.load(weights_only=True).
"""
from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from bisenet_fast.checkpoint import CORRUPT_FILE_ERRORS

LAST_CHECKPOINT_FILE = "last_checkpoint"


class CheckpointCorruptError(RuntimeError):
    """A checkpoint file that cannot be read (truncated, corrupt) or lacks training state."""


def capture_rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)), "pos": np_state["state"]["pos"],
                  "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": npy["key"].numpy().astype(np.uint32), "pos": npy["pos"]},
                         "has_gauss": npy["has_gauss"], "gauss": npy["gauss"]})
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if isinstance(cuda, list):  # written before 2026-11-29: one state per GPU the saver saw
        index = torch.cuda.current_device() if torch.cuda.is_available() else len(cuda)
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def save_atomic(obj, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file in the same folder, fsync, then os.replace: a crash
    mid-write leaves the previous file at `path` (if any) untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_training_checkpoint(state: dict, work_dir: str | os.PathLike) -> Path:
    """Writes iter_<n>.pth and then points `last_checkpoint` at it."""
    work_dir = Path(work_dir)
    path = save_atomic(state, work_dir / f"iter_{state['iteration']}.pth")
    write_text_atomic(work_dir / LAST_CHECKPOINT_FILE, path.name + "\n")
    return path


def latest_checkpoint(work_dir: str | os.PathLike) -> Path | None:
    pointer = Path(work_dir) / LAST_CHECKPOINT_FILE
    if not pointer.is_file():
        return None
    return Path(work_dir) / pointer.read_text().strip()


REQUIRED_KEYS = ("state_dict", "optimizer", "iteration", "rng", "sampler")


def load_training_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint at `path`, or CheckpointCorruptError naming it and the other checkpoints
    beside it (from which training can resume instead)."""
    path = Path(path)

    def fail(why: str):
        others = sorted(p.name for p in path.parent.glob("iter_*.pth") if p != path)
        hint = f"; other checkpoints in {path.parent}: {', '.join(others)}" if others else ""
        raise CheckpointCorruptError(f"cannot resume from {path}: {why}{hint}")

    if not path.is_file():
        fail("no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        fail(f"it holds objects other than tensors, containers, numbers and strings, which are not loaded "
             f"because unpickling them could run code ({str(err).splitlines()[-1][:300]})")
    except (*CORRUPT_FILE_ERRORS, OSError) as err:
        fail(f"the file is not a torch checkpoint, or it is truncated or corrupt ({type(err).__name__}: {err})")
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
        fail(f"it is not a bisenet_fast training checkpoint (missing {missing}); "
             "to start from weights only, load them with bisenet_fast.load_mmseg_checkpoint")
    return state
