"""The committed docs are exactly what ``attnbridge.docs_gen`` renders from the code and from
``docs/bench_results/``: a backend, platform kernel, option or result that changes without the docs
fails here, with the command that regenerates them."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

from attnbridge.docs_gen import BENCH_BEGIN, BENCH_END, REGENERATE, generated_docs, replace_bench_section

ROOT = Path(__file__).resolve().parent.parent
GENERATED = generated_docs(ROOT)


@pytest.mark.parametrize("path", list(GENERATED), ids=[p.name for p in GENERATED])
def test_committed_doc_is_generated(path):
    expected = GENERATED[path]
    actual = path.read_text() if path.exists() else ""
    if actual != expected:
        diff = "".join(
            list(
                difflib.unified_diff(
                    actual.splitlines(True), expected.splitlines(True), str(path), "generated"
                )
            )[:40]
        )
        pytest.fail(f"{path.relative_to(ROOT)} is stale; regenerate it with `{REGENERATE}`\n{diff}")


def test_bench_section_replacement_keeps_the_hand_written_text():
    text = f"intro\n{BENCH_BEGIN}\nold rows\n{BENCH_END}\noutro\n"
    new = replace_bench_section(text, f"{BENCH_BEGIN}\nnew rows\n{BENCH_END}")
    assert new == f"intro\n{BENCH_BEGIN}\nnew rows\n{BENCH_END}\noutro\n"
    assert replace_bench_section("intro\n", "S") == "intro\n\nS\n"
