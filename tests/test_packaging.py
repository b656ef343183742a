"""Recipes and assets ship inside the package: a non-editable install runs without the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from vopd.config import RECIPES_DIR, load_config, recipe_path, recipes

ROOT = Path(__file__).resolve().parents[1]


def test_configs_folder_is_the_shipped_recipes():
    """configs/*.yaml (what users and docs point at) and src/vopd/recipes/*.yaml (package data) agree:
    the same names and the same bytes (configs/ holds links to the recipes: one source of truth)."""
    user = {p.name: p for p in (ROOT / "configs").glob("*.yaml")}
    shipped = {p.name: p for p in RECIPES_DIR.glob("*.yaml")}
    assert user and set(user) == set(shipped)
    for name, path in user.items():
        assert path.read_bytes() == shipped[name].read_bytes(), f"configs/{name} differs from src/vopd/recipes/{name}"
        if path.is_symlink():
            assert path.resolve() == shipped[name].resolve()


def test_recipe_by_name():
    assert {"tiny_cpu", "toy_demo", "paper_qwen35_4b"} <= set(recipes())
    assert load_config("toy_demo").teacher.kind == load_config(recipe_path("toy_demo")).teacher.kind
    with pytest.raises(ValueError, match="shipped recipes"):
        load_config("no_such_recipe")


@pytest.mark.slow
def test_wheel_ships_recipes_and_assets_and_runs_outside_the_tree(tmp_path):
    """Build the wheel (no deps), install it into a bare folder, and use it from elsewhere."""
    src = tmp_path / "src_copy"  # build from a copy: building in place litters the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    (wheel,) = wheels.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in recipes():
        assert f"vopd/recipes/{recipe}.yaml" in names
    for asset in ("model.safetensors", "config.json", "tokenizer.json", "toy_base.json"):
        assert f"vopd/assets/toy_base/{asset}" in names

    target = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    code = (
        "import vopd, sys; from pathlib import Path\n"
        f"assert Path(vopd.__file__).is_relative_to({str(target)!r}), vopd.__file__\n"
        "from vopd.toyworld.demo import DemoConfig, demo_train_config\n"
        "from vopd.toyworld.model import TOY_BASE_DIR\n"
        "cfg = demo_train_config(DemoConfig(out='d'))\n"
        "assert cfg.model.path == 'toy-base' and (TOY_BASE_DIR / 'model.safetensors').is_file()\n"
        "from vopd.config import load_config; assert load_config('tiny_cpu').model.path\n"
        "print('OK', vopd.__file__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
    out = subprocess.run(
        [sys.executable, "-m", "vopd.cli", "demo", "--help"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and "--out" in out.stdout, out.stderr[-3000:]
