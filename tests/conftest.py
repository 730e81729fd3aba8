"""Makes the node pack importable as ``fusion_style``, loaded the way ComfyUI loads a custom node folder.

ComfyUI imports ``custom_nodes/<folder>/__init__.py`` as a package (``spec_from_file_location``); the nodes
reach fusion_core through relative imports inside that package. The tests load the repository the same way.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from fusion_core import precision

ROOT = Path(__file__).resolve().parents[1]
PACK = "fusion_style"


def _load_pack() -> None:
    if PACK in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)


_load_pack()


@pytest.fixture(autouse=True)
def float32_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests compare against float32 computations, on whatever CPU runs them: the bfloat16 path that CPUs with
    bfloat16 instructions take by default is switched on only by the tests written for it."""
    monkeypatch.setattr(precision, "native_bfloat16", lambda: False)
