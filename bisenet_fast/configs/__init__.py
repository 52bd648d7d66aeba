"""The four published BiSeNetV2 Cityscapes recipes (spec §7, mmseg 0.x semantics, OHEM as in
0.28+) and the 'synthetic' demo recipe, as JSON files next to this module.

    load_recipe("bisenetv2_fcn_4x4_1024x1024_160k_cityscapes")   # 0.x name
    load_recipe("bisenetv2_fcn_4xb4-160k_cityscapes-1024x1024")  # 1.x name (alias)
    load_recipe("path/to/my_recipe.json")
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent


def recipe_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.json"))}


def recipe_names() -> list[str]:
    return list(recipe_files())


def load_recipe(name_or_path: str) -> dict:
    """A fresh dict of the recipe named (0.x name, 1.x alias) or stored at a .json path."""
    path = Path(name_or_path)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {str(path)!r} does not exist")
        return json.loads(path.read_text())
    files = recipe_files()
    for name, file in files.items():
        recipe = json.loads(file.read_text())
        if name_or_path == name or name_or_path in recipe.get("aliases", []):
            return copy.deepcopy(recipe)
    raise ValueError(f"unknown recipe {name_or_path!r}; expected a .json path or one of {sorted(files)}")
