"""The benchmarks' ``--set NAME=VALUE`` options, read into ``Settings`` field changes (no fusion_core import here:
benchmarks/checkout_ab.py reads them before it chooses which checkout's fusion_core to import)."""

from __future__ import annotations

import json


def setting_changes(items: list[str]) -> dict[str, object]:
    """NAME=VALUE items -> {NAME: VALUE}: VALUE as JSON where it parses (a list becomes a tuple, as ``Settings``'
    layer fields are), else the string itself."""
    changes: dict[str, object] = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            changes[name] = json.loads(value)
        except json.JSONDecodeError:
            changes[name] = value
        if isinstance(changes[name], list):
            changes[name] = tuple(changes[name])
    return changes
