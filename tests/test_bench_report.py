"""``scripts/bench_report.py`` against the committed record: the results section of
docs/benchmarks.md is what the script renders from ``docs/bench_results/*.json``, and every result
names its kind, device, date and command, so no number appears without how it was measured."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_docs_generated import assert_up_to_date

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"


def _load(name: str):
    """A script as a module: ``scripts/`` is no package, its scripts import each other by name."""
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    return importlib.import_module(name)


report = _load("bench_report")
RESULTS = sorted((ROOT / report.BENCH_DIR).glob("*.json"))


def test_committed_section_is_rendered_from_the_json():
    docs = ROOT / report.DOCS_PATH
    expected = report.rendered_docs(ROOT / report.BENCH_DIR, docs)
    assert_up_to_date(docs.read_text(), expected, str(report.DOCS_PATH), report.REGENERATE)


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_every_result_names_its_kind_device_date_and_command(path):
    data = json.loads(path.read_text())
    assert data.get("kind") in report.RENDERERS, f'{path.name}: "kind" {data.get("kind")!r}'
    for key in ("device", "torch", "date", "command"):
        assert data.get(key), f"{path.name} has no {key!r}"
    assert path.name in data["command"], f"{path.name}: its command writes another file"


def test_a_result_without_a_known_kind_is_an_error(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"rows": [{"kernel": "k", "ms": 1.0}]}))
    with pytest.raises(ValueError, match="kind"):
        report.load_results(tmp_path)


def test_every_writer_script_declares_a_known_kind():
    """Each script that writes results passes a ``kind`` the report renders."""
    writers = [
        p for p in SCRIPTS.glob("*.py") if "write_json(" in p.read_text() and p.name != "bench_common.py"
    ]
    assert writers
    for path in writers:
        text = path.read_text()
        kinds = {k for k in report.RENDERERS if f'kind="{k}"' in text}
        assert kinds, f"{path.name} writes JSON without a kind that bench_report.py renders"


def test_section_replacement_keeps_the_hand_written_text():
    begin, end = report.BENCH_BEGIN, report.BENCH_END
    text = f"intro\n{begin}\nold rows\n{end}\noutro\n"
    new = report.replace_bench_section(text, f"{begin}\nnew rows\n{end}")
    assert new == f"intro\n{begin}\nnew rows\n{end}\noutro\n"
    assert report.replace_bench_section("intro\n", "S") == "intro\n\nS\n"


def test_bench_all_from_json_renders_the_same_section(tmp_path):
    """``bench_all.py --from-json`` goes through the same renderer: run it on a copy of the record."""
    docs = tmp_path / "benchmarks.md"
    docs.write_text((ROOT / report.DOCS_PATH).read_text())
    out = tmp_path / "results"
    subprocess.run(
        [
            sys.executable,
            str(SCRIPTS / "bench_all.py"),
            "--from-json",
            str(ROOT / report.BENCH_DIR),
            "--out-dir",
            str(out),
            "--docs",
            str(docs),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert sorted(p.name for p in out.glob("*.json")) == [p.name for p in RESULTS]
    assert report.render_bench_section(out) in docs.read_text()


def test_wan_step_rows_render_compiled_and_failed_runs(tmp_path):
    """A ``--compile`` result: both modes, both ratios, and a failed compile shown with its error."""
    rows = [
        {"backend": "diffusers default (unpatched)", "mode": "eager", "ms": 10.0, "rel_l2": "-"},
        {"backend": "diffusers default (unpatched)", "mode": "compiled", "ms": 8.0, "rel_l2": "1.00e-07"},
        {"backend": "fa", "mode": "eager", "ms": 9.0, "rel_l2": "0.00e+00"},
        {"backend": "fa", "mode": "compiled", "ms": None, "rel_l2": "-", "error": "Unsupported: graph break"},
    ]
    wan_step = _load("bench_wan_step")
    wan_step.add_ratios(rows, ["eager", "compiled"])
    assert rows[2]["speedup vs default eager"] == "1.111x"
    assert rows[2]["speedup vs default compiled"] == "0.889x"
    assert rows[3]["speedup vs default compiled"] == "-"
    data = {"kind": "wan_step", "device": "d", "torch": "t", "date": "x", "command": "c", "rows": rows}
    (tmp_path / "step.json").write_text(json.dumps(data))
    section = report.render_bench_section(tmp_path)
    assert "| `fa` | compiled | failed: Unsupported: graph break | - | - | - |" in section
    assert "| diffusers default (unpatched) | compiled | 8.0 | 1.250x | 1.000x | 1.00e-07 |" in section


def _run_wan_step(tmp_path, *extra) -> dict:
    pytest.importorskip("diffusers")
    wan_step = _load("bench_wan_step")
    out = tmp_path / "step.json"
    argv = ["--small", "--backends", "sdpa", "--warmup", "0", "--repeat", "1", "--out", str(out), *extra]
    assert wan_step.main(argv) == 0
    return json.loads(out.read_text())


def test_wan_step_reports_a_failed_compile_and_carries_on(tmp_path, monkeypatch):
    wan_step = _load("bench_wan_step")

    def fail(model):
        raise RuntimeError("no graph today\nand a second line")

    monkeypatch.setattr(wan_step, "compile_blocks", fail)
    data = _run_wan_step(tmp_path, "--compile")
    assert data["kind"] == "wan_step" and data["compile"] is True
    rows = data["rows"]
    assert [(r["backend"], r["mode"]) for r in rows] == [
        (wan_step.DEFAULT, "eager"),
        (wan_step.DEFAULT, "compiled"),
        ("sdpa", "eager"),
        ("sdpa", "compiled"),
    ]
    for row in rows[1], rows[3]:
        assert row["ms"] is None and row["error"] == "RuntimeError: no graph today"
    assert rows[2]["ms"] > 0 and rows[2]["speedup vs default compiled"] == "-"


@pytest.mark.slow
def test_wan_step_compiles_the_repeated_blocks_on_the_cpu(tmp_path):
    """The real regional compile, smoke size: the unpatched default compiles; a patched backend's
    compile either runs or is a failed row, never a crash."""
    rows = _run_wan_step(tmp_path, "--compile")["rows"]
    assert len(rows) == 4 and rows[1]["mode"] == "compiled"
    assert rows[1]["ms"] is not None, rows[1].get("error")
    assert rows[3]["ms"] is not None or rows[3]["error"]


def test_qwen_image_padding_run_matches_the_unpatched_model_and_renders(tmp_path):
    """The padding benchmark on a tiny config: `fa` equals the unpatched model with and without a
    padded text mask, and its file renders into the results section."""
    pytest.importorskip("diffusers")
    bench = _load("bench_qwen_image_padding")
    out = tmp_path / "qwen_image_padding.json"
    argv = ["--small", "--backends", "fa", "--warmup", "0", "--repeat", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["kind"] == "qwen_image_padding" and data["padded_text_tokens"] > 0
    fa = next(r for r in data["rows"] if r["backend"] == "fa")
    assert float(fa["unpadded rel_l2"]) < 1e-5 and float(fa["padded rel_l2"]) < 1e-5
    assert "Qwen-Image with a padded text mask" in report.render_bench_section(tmp_path)


def test_sparse_rows_render_blocks_per_row_and_selection_kernels(tmp_path):
    """``bench_sparse.py --profile-selection`` adds the spread of kept blocks per row and the
    selection's slowest kernels; both reach the rendered entry."""
    bench = _load("bench_sparse")
    out = tmp_path / "sparse_small.json"
    argv = [
        "--small",
        "--out",
        str(out),
        "--sparsity",
        "0.75",
        "--backends",
        "block_sparse",
        "--vsa-sparsity",
    ]
    assert bench.main(argv) == 0
    data = json.loads(out.read_text())
    row = data["results"][0]
    assert 1 <= row["kept_per_row"]["min"] <= row["kept_per_row"]["mean"] <= row["kept_per_row"]["max"]
    row["select_kernels"] = [{"kernel": "triton_pool", "us_per_call": 12.5}]  # a GPU run's field
    out.write_text(json.dumps(data))
    section = report.render_bench_section(tmp_path)
    per_row = row["kept_per_row"]
    assert f"{per_row['min']} / {per_row['mean']} / {per_row['max']}" in section
    assert "Selection kernels, `block_sparse` 0.75, per call: triton_pool 12.5 us" in section
