"""The four published BiSeNetV2 Cityscapes recipes (spec §7, mmseg 0.x semantics, OHEM as in
0.28+) and the 'synthetic' demo recipe, as JSON files next to this module.

    load_recipe("bisenetv2_fcn_4x4_1024x1024_160k_cityscapes")   # 0.x name
    load_recipe("bisenetv2_fcn_4xb4-160k_cityscapes-1024x1024")  # 1.x name (alias)
    load_recipe("path/to/my_recipe.json")
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent


def recipe_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.json"))}


def recipe_names() -> list[str]:
    return list(recipe_files())


# Read with a default where absent (or descriptive only); every other key that all the
# bundled recipes have, a recipe from a file needs too.
OPTIONAL_KEYS = ("name", "aliases", "official", "gpus", "amp", "eval_interval", "log_interval")


def _key_paths(recipe: dict, prefix: str = "") -> set[str]:
    paths = set()
    for key, value in recipe.items():
        paths.add(prefix + key)
        if isinstance(value, dict):
            paths |= _key_paths(value, f"{prefix}{key}.")
    return paths


def required_keys() -> list[str]:
    """Dotted paths ('data.crop_size') that a recipe file must have."""
    shared = set.intersection(*(_key_paths(json.loads(f.read_text())) for f in recipe_files().values()))
    return sorted(p for p in shared if p.split(".")[0] not in OPTIONAL_KEYS)


def _get(recipe: dict, path: str):
    for key in path.split("."):
        recipe = recipe[key]
    return recipe


def _kind(value) -> str:
    """The JSON kind a recipe value must have, as the bundled recipes write it."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _has_kind(value, kind: str) -> bool:
    if kind == "an integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "a number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return _kind(value) == kind


def _type_errors(recipe: dict, paths: list[str]) -> list[str]:
    """'key: expected ..., got ...' for each value whose kind differs from the bundled recipes'
    (a string lr, a non-list crop_size, ...), which would otherwise fail deep inside a run.
    Pairs ([h, w], [w, h], [lo, hi]) must have two entries; integer pairs and num_classes, positive."""
    bundled = [json.loads(f.read_text()) for f in recipe_files().values()]
    errors = []
    for path in paths:
        examples = [_get(r, path) for r in bundled]
        if any(isinstance(e, dict) for e in examples):
            continue
        kinds = {_kind(e) for e in examples}
        if len(kinds) != 1:
            continue
        kind, value = kinds.pop(), _get(recipe, path)
        if not _has_kind(value, kind):
            errors.append(f"{path}: expected {kind}, got {value!r}")
            continue
        if path == "model.num_classes" and value < 1:
            errors.append(f"{path}: expected an integer >= 1, got {value!r}")
        if kind != "a list":
            continue
        # The kind of the lists' items: one kind, or numbers where the bundled lists mix ints
        # and floats; None (anything) where they mix other kinds.
        item_kinds = {_kind(v) for e in examples for v in e}
        if item_kinds == {"an integer", "a number"}:
            item_kind = "a number"
        else:
            item_kind = item_kinds.pop() if len(item_kinds) == 1 else None
        pair = all(len(e) == 2 for e in examples)
        if (not value or (pair and len(value) != 2)
                or (item_kind and not all(_has_kind(v, item_kind) for v in value))
                or (item_kind == "an integer" and not all(v >= 1 for v in value))):
            what = "two" if pair else "one or more"
            positive = " positive" if item_kind == "an integer" else ""
            errors.append(f"{path}: expected a list of {what}{positive} "
                          f"{(item_kind or 'value').split(' ', 1)[1]}s, got {value!r}")
    return errors


AMP_DTYPE_NAMES = ("none", "float16", "bfloat16")  # evaluate.AMP_DTYPES' keys


def _optional_errors(recipe: dict) -> list[str]:
    """'name' and 'amp' are optional (absent: the file's stem; absent or null: float32), so the
    required keys' check skips them; when given, what train and evaluate read from them must be
    valid (a name 5 was a TypeError in os.path.join, an empty one put the run in work_dirs/
    itself; an amp dtype 'fp16' a bare KeyError: 'fp16', a string amp an AttributeError)."""
    errors = []
    if "name" in recipe and not (isinstance(recipe["name"], str) and recipe["name"].strip()):
        errors.append(f"name: expected a non-empty string (the default work dir is work_dirs/<name>), "
                      f"got {recipe['name']!r}")
    amp = recipe.get("amp")
    if amp is None:
        return errors
    if not isinstance(amp, dict):
        return errors + [f'amp: expected null or an object such as {{"dtype": "float16", "loss_scale": 512.0}}, '
                         f"got {amp!r}"]
    if amp.get("dtype", "none") not in AMP_DTYPE_NAMES:
        errors.append(f"amp.dtype: expected one of {AMP_DTYPE_NAMES}, got {amp['dtype']!r}")
    scale = amp.get("loss_scale", 512.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        errors.append(f"amp.loss_scale: expected a positive number, got {scale!r}")
    if not isinstance(amp.get("eval_autocast", False), bool):
        errors.append(f"amp.eval_autocast: expected a boolean, got {amp['eval_autocast']!r}")
    return errors


def check_recipe(recipe, source: str) -> None:
    """A clear error for a recipe file that lacks keys or has a value of the wrong type,
    instead of a KeyError or TypeError mid-run."""
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {source}: expected a JSON object, got {type(recipe).__name__}")
    present = _key_paths(recipe)
    missing = [p for p in required_keys() if p not in present]
    if missing:
        raise ValueError(f"recipe {source} lacks {', '.join(missing)} (the bundled recipes, e.g. "
                         f"{CONFIG_DIR / 'synthetic.json'}, show every key)")
    wrong = _type_errors(recipe, required_keys()) + _optional_errors(recipe)
    if wrong:
        raise ValueError(f"recipe {source} has invalid values:\n  " + "\n  ".join(wrong)
                         + f"\n(the bundled recipes, e.g. {CONFIG_DIR / 'synthetic.json'}, show each key's type)")


def load_recipe(name_or_path: str) -> dict:
    """A fresh dict of the recipe named (0.x name, 1.x alias) or stored at a .json path (its
    name, if it gives none, is the file's stem)."""
    path = Path(name_or_path)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {str(path)!r} does not exist")
        try:
            recipe = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"recipe {str(path)!r} is not valid JSON: {err}") from None
        check_recipe(recipe, repr(str(path)))
        recipe.setdefault("name", path.stem)
        return recipe
    files = recipe_files()
    for name, file in files.items():
        recipe = json.loads(file.read_text())
        if name_or_path == name or name_or_path in recipe.get("aliases", []):
            return copy.deepcopy(recipe)
    raise ValueError(f"unknown recipe {name_or_path!r}; expected a .json path or one of {sorted(files)}")
