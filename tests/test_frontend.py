"""The frontend extension in web/ (ComfyUI serves it because __init__.py names WEB_DIRECTORY), run in Node.js with
stand-ins for the frontend's app and api modules at the paths ComfyUI serves them from."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import fusion_style
import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_NAMES = [path.stem for path in sorted((ROOT / "workflows").glob("*.json"))]
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="Node.js is not installed: the frontend extension is not run")

# ComfyUI serves the frontend's modules at /scripts/ and an extension at /extensions/<pack folder>/<file>.
APP_STUB = "export const app = { registerExtension(extension) { globalThis.registered.push(extension); } };\n"
API_STUB = "export const api = { async getWorkflowTemplates() { return structuredClone(globalThis.listed); } };\n"
RUNNER = """
globalThis.registered = [];
globalThis.listed = JSON.parse(process.argv[2]);
const { api } = await import("./scripts/api.js");
await import("./extensions/PACK/template_order.js");
for (const extension of globalThis.registered) await extension.init?.();
const names = globalThis.registered.map((extension) => extension.name);
console.log(JSON.stringify({ names, listed: await api.getWorkflowTemplates() }));
"""


def run_extension(tmp_path: Path, pack: str, listed: dict) -> dict:
    (tmp_path / "scripts").mkdir(parents=True)
    (tmp_path / "scripts" / "app.js").write_text(APP_STUB)
    (tmp_path / "scripts" / "api.js").write_text(API_STUB)
    served = tmp_path / "extensions" / pack
    served.mkdir(parents=True)
    for path in (ROOT / fusion_style.WEB_DIRECTORY).glob("*.js"):
        shutil.copy(path, served / path.name)
    (tmp_path / "package.json").write_text('{"type": "module"}')
    (tmp_path / "run.js").write_text(RUNNER.replace("PACK", pack))
    done = subprocess.run(
        [NODE, "run.js", json.dumps(listed)], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_pack_names_its_web_directory():
    web = ROOT / fusion_style.WEB_DIRECTORY
    assert web.is_dir() and (web / "template_order.js").is_file()


@needs_node
@pytest.mark.parametrize("pack", ["fusion-style", "fusion_style", "My Packs"])
def test_the_templates_browser_lists_the_workflows_in_their_numbered_order(tmp_path, pack):
    shuffled = WORKFLOW_NAMES[:]
    random.Random(0).shuffle(shuffled)
    assert shuffled != WORKFLOW_NAMES  # as ext4 returns them: not in order
    other = ["zeta", "alpha", "10_b", "9_a"]  # another pack's list is left as it came
    result = run_extension(tmp_path, pack, {pack: shuffled, "other-pack": other})
    assert result["names"] == ["fusion_style.TemplateOrder"]
    listed = result["listed"][pack]
    assert sorted(listed) == sorted(WORKFLOW_NAMES)
    numbered = [name for name in listed if name.split("_")[0].isdigit()]
    numbers = [int(name.split("_")[0]) for name in numbered]
    assert numbers == sorted(numbers) and listed[0].startswith("1_basic")
    assert listed[: len(numbered)] == numbered  # a name without a number (fusion_print_2048) after them
    assert result["listed"]["other-pack"] == other


@needs_node
def test_numbers_sort_as_numbers_and_a_list_without_the_pack_passes_through(tmp_path):
    result = run_extension(tmp_path, "fusion-style", {"fusion-style": ["2_y", "10_x", "1_z"], "other": ["b", "a"]})
    assert result["listed"] == {"fusion-style": ["1_z", "2_y", "10_x"], "other": ["b", "a"]}
    result = run_extension(tmp_path / "without", "fusion-style", {"other": ["b", "a"]})
    assert result["listed"] == {"other": ["b", "a"]}


def test_the_templates_category_is_titled_with_the_packs_display_name():
    # The frontend titles a pack's template category with the translation of templateWorkflows.category.<folder>
    # (dots as underscores), which ComfyUI's /i18n gathers from locales/; the folder is the registry's name for the
    # pack (or the repository's, cloned), or the name the acceptance runs link it under.
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    titles = json.loads((ROOT / "locales" / "en" / "main.json").read_text(encoding="utf-8"))
    category = titles["templateWorkflows"]["category"]
    display = pyproject["tool"]["comfy"]["DisplayName"]
    for folder in (pyproject["project"]["name"], "fusion_style"):
        assert category[folder.replace(".", "_")] == display
