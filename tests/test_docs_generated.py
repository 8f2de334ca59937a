"""The committed capability docs are exactly what ``scripts/gen_docs.py`` renders from the code: a
backend, platform kernel or option that changes without the docs fails here, with the command that
regenerates them. (The benchmark results section is checked in ``tests/test_bench_report.py``.)"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from gen_docs import PLATFORMS_DOC, REGENERATE, generated_docs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GENERATED = generated_docs(ROOT)


def assert_up_to_date(actual: str, expected: str, name: str, regenerate: str) -> None:
    """Fail with the first lines of the difference and the command that regenerates ``name``."""
    if actual != expected:
        diff = difflib.unified_diff(actual.splitlines(True), expected.splitlines(True), name, "generated")
        pytest.fail(f"{name} is stale; regenerate it with `{regenerate}`\n{''.join(list(diff)[:40])}")


@pytest.mark.parametrize("path", list(GENERATED), ids=[p.name for p in GENERATED])
def test_committed_doc_is_generated(path):
    actual = path.read_text() if path.exists() else ""
    assert_up_to_date(actual, GENERATED[path], str(path.relative_to(ROOT)), REGENERATE)


def test_platform_links_land_on_a_section():
    """The generated docs link to ``platforms.md#<platform>``; each such section must exist there."""
    platforms = (ROOT / "docs" / PLATFORMS_DOC).read_text()
    headings = {line[3:].strip() for line in platforms.splitlines() if line.startswith("## ")}
    for text in GENERATED.values():
        for anchor in set(re.findall(rf"\({re.escape(PLATFORMS_DOC)}#([\w-]+)\)", text)):
            assert anchor in headings, f"{PLATFORMS_DOC} has no section '## {anchor}'"
