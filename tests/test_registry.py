"""Comfy Registry readiness: the pyproject.toml fields the registry reads (docs.comfy.org/registry/specifications;
ComfyUI's own reader is comfy_config/config_parser.py), the icon, and what .comfyignore keeps out of the package."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
from PIL import Image

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; older ones skip these checks
ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT, COMFY = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
OLDEST_COMFYUI = "0.3.64"  # the ComfyUI the workflows in workflows/ were run on
ICON = "assets/icon.png"  # shipped in the package (docs/ is not)


def test_project_fields_the_registry_requires():
    name = PROJECT["name"]
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", name)
    assert "comfyui" not in name.lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", PROJECT["version"])
    assert PROJECT["description"].strip() and PROJECT["license"] in ({"text": "MIT"}, {"file": "LICENSE"})
    repository = urlparse(PROJECT["urls"]["Repository"])
    assert repository.scheme == "https" and repository.netloc == "github.com"


def test_tool_comfy_is_complete():
    assert COMFY["PublisherId"].strip() and COMFY["DisplayName"].strip()
    assert COMFY["requires-comfyui"] == f">={OLDEST_COMFYUI}"
    # The registry takes a URL: the raw file of the icon in this repository.
    icon = urlparse(COMFY["Icon"])
    repository = urlparse(PROJECT["urls"]["Repository"]).path.strip("/")
    assert icon.scheme == "https" and icon.netloc == "raw.githubusercontent.com"
    assert icon.path.startswith(f"/{repository}/") and icon.path.endswith(f"/{ICON}")


def test_icon_is_square_small_and_loads():
    path = ROOT / ICON
    assert path.is_file()
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        assert image.width == image.height <= 400


def comfyignore_patterns() -> list[str]:
    lines = (ROOT / ".comfyignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str) -> bool:
    """Whether ``path`` (relative, '/'-separated) is left out by a .comfyignore pattern (the gitignore forms used
    there: ``dir/`` and file names)."""
    parts = path.split("/")
    for pattern in comfyignore_patterns():
        if pattern.endswith("/"):
            if pattern.rstrip("/") in parts[:-1]:
                return True
        elif any(fnmatch.fnmatch(part, pattern) for part in parts):
            return True
    return False


@pytest.mark.parametrize("path", ["benchmarks/bench.py", "docs/readme_hero.jpg", "tests/test_nodes.py", ".ci/run"])
def test_comfyignore_leaves_out_what_only_developers_need(path):
    assert (ROOT / path).exists() and ignored(path)


@pytest.mark.parametrize(
    "path",
    [
        ICON,
        "__init__.py",
        "nodes/optimize.py",
        "fusion_core/stylize.py",
        "web/template_order.js",
        "locales/en/main.json",
        "workflows/1_basic.json",
        "pyproject.toml",
        "README.md",
    ],
)
def test_comfyignore_keeps_the_pack(path):
    assert (ROOT / path).exists() and not ignored(path)


def test_ruff_keeps_the_rules_of_the_registry_scan():
    assert {"S102", "S307", "E702"} <= set(PYPROJECT["tool"]["ruff"]["lint"]["select"])
