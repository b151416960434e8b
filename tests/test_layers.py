"""Layer rules of the drivers, plans and cache: only op modules and comm backends import the
compiled core (`_core`); nothing in the package imports `esp_kernels.testing`; the decode index
maps are plain Python (no torch)."""

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "esp_kernels"

# Drivers, runners, plans and the cache: above the ops, so no core.
NO_CORE = ["decode/driver.py", "decode/runner.py", "decode/plan.py", "decode/layout.py",
           "prefill/ring.py", "kvcache/cache.py", "kvcache/retention.py",
           "kvcache/migration.py"]


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module name a file imports, relative imports spelled with their dots."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.add(base)
            names.update(f"{base}.{a.name}" if node.module else f"{base}{a.name}"
                         for a in node.names)
    return names


def last_part(name: str) -> str:
    return name.rstrip(".").split(".")[-1]


@pytest.mark.parametrize("rel", NO_CORE)
def test_drivers_plans_and_cache_do_not_touch_the_core(rel):
    mods = imported_modules(PKG / rel)
    assert not {m for m in mods if last_part(m) in ("_core", "_C")}, mods
    assert not {m for m in mods if last_part(m) == "testing"}, mods


def test_decode_layout_is_plain_python():
    mods = imported_modules(PKG / "decode/layout.py")
    assert mods <= {"__future__", "__future__.annotations", "dataclasses"}, mods
