"""Every module of fusionlib has its page section in the book's library reference (book/api/).

Chapters link to the library code they use through these pages, so a module
left out of them is a module a reader cannot find from the book.
"""

from __future__ import annotations

import re
from pathlib import Path

# The same walk over fusionlib/ as the import-layer test.
from test_imports import PACKAGE_DIR, find_modules

ROOT = Path(__file__).resolve().parents[1]


def library_modules() -> set[str]:
    """Dotted names of every module of fusionlib, ``__main__`` modules left out (they have no API)."""
    return {
        name for name in find_modules(PACKAGE_DIR, "fusionlib") if not name.endswith(".__main__")
    }


def documented_modules() -> set[str]:
    names = set()
    for page in (ROOT / "book" / "api").glob("*.md"):
        names |= set(re.findall(r"automodule:: ([\w.]+)", page.read_text()))
    return names


def test_every_module_has_a_reference_section():
    missing = sorted(library_modules() - documented_modules())
    assert not missing, f"modules with no automodule in book/api/*.md: {missing}"


def test_every_reference_section_names_a_module():
    stale = sorted(documented_modules() - library_modules())
    assert not stale, f"book/api/*.md documents modules that do not exist: {stale}"
