"""The results section of docs/benchmarks.md, rendered from the JSON the benchmark scripts write.

Every benchmark script writes one JSON file per run (``bench_common.write_json``) whose ``kind``
says which script wrote it and so how to render it, next to the device, torch version, date and
command of the run. This module turns ``docs/bench_results/*.json`` into the tables between
``<!-- bench:begin -->`` and ``<!-- bench:end -->`` of docs/benchmarks.md (the prose outside the
markers is hand-written and kept), so the committed numbers are the measured ones, each with the
device, command and date that produced it. It lives with the scripts, not in the package: the
results are this repository's record, not something an installed attnbridge needs.

    python scripts/bench_report.py              # rewrite the section from docs/bench_results/*.json
    python scripts/bench_report.py --check      # exit 1 when the committed section is stale
    python scripts/bench_report.py --plot       # also redraw speedup_vs_sparsity.png (matplotlib)

``tests/test_bench_report.py`` runs the check; ``scripts/bench_all.py`` calls this after its runs
(or, with ``--from-json DIR``, instead of them).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = "docs/bench_results"
DOCS_PATH = "docs/benchmarks.md"
BENCH_BEGIN = "<!-- bench:begin -->"
BENCH_END = "<!-- bench:end -->"
PLOT_NAME = "speedup_vs_sparsity.png"
REGENERATE = "python scripts/bench_report.py"


@dataclass
class BenchResult:
    """One result file: its path and its JSON (``kind``, ``device``, ``torch``, ``date``, ``command``
    and the script's own fields)."""

    path: Path
    data: dict = field(repr=False)

    @property
    def kind(self) -> str:
        return self.data["kind"]

    @property
    def device(self) -> str:
        return str(self.data.get("device", "unknown device")).strip()


def load_results(results_dir: Path) -> list[BenchResult]:
    """Every ``*.json`` of ``results_dir``, sorted by name. A file without a ``kind`` this module
    renders is an error, not skipped: a result left out of the docs would go unnoticed."""
    results = []
    for path in sorted(Path(results_dir).glob("*.json")):
        data = json.loads(path.read_text())
        kind = data.get("kind")
        if kind not in RENDERERS:
            raise ValueError(
                f'{path}: "kind" is {kind!r}, not one of {", ".join(RENDERERS)} '
                "(every benchmark script writes it through bench_common.write_json)"
            )
        results.append(BenchResult(path, data))
    return results


# ----------------------------------------------------------------------------------------------
# Formatting


def _fmt(value, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 10**-digits or value == 0 else f"{value:.1e}"
    return "-" if value is None else str(value)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _shape_text(shape, dtype: str = "") -> str:
    """``B=1, S=32760, H=12, D=128, bfloat16, grid (21, 30, 52)`` from any bench script's shape."""
    if isinstance(shape, dict):
        seq = shape.get("seq", shape.get("tokens"))
        bits = [
            f"B={shape.get('batch', '?')}",
            f"S={seq}",
            f"H={shape.get('heads')}",
            f"D={shape.get('head_dim')}",
        ]
        dtype = shape.get("dtype", dtype)
        grid = f"grid {tuple(shape['grid'])}" if shape.get("grid") else ""
    else:
        bits = [f"{k}={v}" for k, v in zip("BSHD", shape or [])]
        grid = ""
    return ", ".join(b for b in (*bits, str(dtype).removeprefix("torch."), grid) if b)


def _device_text(data: dict) -> str:
    device = str(data.get("device", "unknown device")).strip()
    world = int(data.get("world_size", 1))
    return f"{world} x {device} on one host" if world > 1 else device


def _meta(results: list[BenchResult]) -> list[str]:
    """Where, how and when an entry was measured: the device / software / date line, the
    command(s) and the raw files."""
    lines = []
    for text in dict.fromkeys(_run_text(r.data) for r in results):
        lines.append(f"- {text}")
    commands = [(r.data.get("command") or "not recorded", r.path.name) for r in results]
    if len(commands) == 1:
        lines.append(f"- Command: `{commands[0][0]}`")
    else:
        lines.append("- Commands:")
        lines += [f"  - `{command}` (`{name}`)" for command, name in commands]
    lines.append("- Raw: " + ", ".join(f"`{BENCH_DIR}/{r.path.name}`" for r in results))
    return lines


def _run_text(data: dict) -> str:
    software = f"torch {data.get('torch', '?')}"
    if data.get("diffusers"):
        software += f", diffusers {data['diffusers']}"
    return f"Device: {_device_text(data)}; {software}; date: {data.get('date', 'not recorded')}"


def _entry(title: str, results: list[BenchResult], details: list[str], table: str) -> str:
    return "\n".join([f"### {title}\n", *_meta(results), *details, "", table])


def _backend_cell(name: str) -> str:
    """``block_sparse:0.85`` -> ```block_sparse` 0.85``; names that are no backend stay as they are."""
    if " " in name:
        return name
    backend, _, sparsity = name.partition(":")
    return f"`{backend}`" + (f" {sparsity}" if sparsity else "")


# ----------------------------------------------------------------------------------------------
# One renderer per kind


def _render_dense(results: list[BenchResult]) -> str:
    (result,) = results
    data = result.data
    rows = [
        [
            r["kernel"],
            _fmt(r["ms"]),
            _fmt(r.get("TFLOP/s", r.get("note", "")), 1),
            str(r.get("rel_l2", "")),
            str(r.get("vs fastest SDPA", "")),
        ]
        for r in data["rows"]
    ]
    return _entry(
        f"Dense attention (`{result.path.name}`)",
        results,
        [f"- Shape {_shape_text(data.get('shape'), data.get('dtype', ''))}"],
        _md_table(["kernel", "ms", "TFLOP/s", "rel_l2", "vs fastest SDPA"], rows),
    )


def _render_sparse(results: list[BenchResult]) -> str:
    (result,) = results
    data = result.data
    cols = ["backend", "sparsity", "ms", "select ms", "kernel ms", "speedup vs cuDNN", "kept", "rel-L2"]
    rows = [
        [
            f"`{r['backend']}`",
            f"{r['sparsity']:.2f}",
            _fmt(r["ms"]),
            _fmt(r.get("select_ms", "")),
            _fmt(r.get("kernel_ms", "")),
            f"{r['speedup_vs_dense']:.2f}x",
            _fmt(r.get("kept_fraction", "")),
            _fmt(r.get("rel_l2", ""), 4),
        ]
        for r in data["results"]
    ]
    if any(r.get("oracle_rel_l2") is not None for r in data["results"]):
        # Per-row top-k ranked by exact attention mass, same budget: a reference (bench_sparse.py).
        cols.append("oracle rel-L2")
        for row, r in zip(rows, data["results"]):
            row.append("-" if r.get("oracle_rel_l2") is None else _fmt(r["oracle_rel_l2"], 4))
    if any("kept_per_row" in r for r in data["results"]):
        cols.append("blocks per row (min / mean / max)")
        for row, r in zip(rows, data["results"]):
            per_row = r.get("kept_per_row")
            row.append("-" if per_row is None else f"{per_row['min']} / {per_row['mean']} / {per_row['max']}")
    details = [
        f"- Shape {_shape_text(data.get('shape', {}))}; dense cuDNN SDPA {_fmt(data['dense_cudnn_ms'])} ms; "
        f"block-sparse kernel: {data.get('kernel', 'FlexAttention')}"
        + (f"; {data['note']}" if data.get("note") else "")
    ]
    for r in data["results"]:
        if r.get("select_kernels"):
            kernels = ", ".join(f"{k['kernel']} {k['us_per_call']} us" for k in r["select_kernels"])
            details.append(f"- Selection kernels, `{r['backend']}` {r['sparsity']:.2f}, per call: {kernels}")
    return _entry(
        f"Sparse backends vs dense cuDNN (`{result.path.name}`)", results, details, _md_table(cols, rows)
    )


def _vsa_total(data: dict) -> tuple[float, float] | None:
    """(dense ms, vsa total ms) of a bench_vsa result."""
    timings = data["timings_ms"]
    dense = next((ms for what, ms in timings.items() if what.startswith("dense")), None)
    total = next((ms for what, ms in timings.items() if what.startswith("vsa total")), None)
    return None if dense is None or total is None else (dense, total)


def _render_vsa(results: list[BenchResult]) -> str:
    results = sorted(results, key=lambda r: r.data.get("sparsity", 0))
    cols = ["sparsity", "top-k tiles", "dense ms", "vsa ms", "speedup vs dense", "fine-stage rel-L2"]
    cols += ["tile buffer MB", "buffer addresses", "allocations per call (no reuse)", "file"]
    rows = []
    for result in results:
        data = result.data
        totals = _vsa_total(data) or (float("nan"), float("nan"))
        buffer = data.get("tile_buffer", {})
        allocs = buffer.get("allocations_per_call")
        rows.append(
            [
                f"{data.get('sparsity', '?')}",
                str(data.get("topk", "")),
                _fmt(totals[0]),
                _fmt(totals[1]),
                f"{totals[0] / totals[1]:.2f}x",
                _fmt(data.get("fine_stage_max_rel_l2", ""), 4),
                f"{buffer['buffer_bytes'] / 1e6:.0f}" if "buffer_bytes" in buffer else "-",
                _fmt(buffer.get("distinct_buffer_pointers")),
                "-" if allocs is None else f"{allocs:g} ({buffer['allocations_per_call_without_reuse']:g})",
                f"`{result.path.name}`",
            ]
        )
    first = results[0].data
    return _entry(
        "VSA vs dense cuDNN",
        results,
        [f"- Shape {_shape_text(first.get('shape'), first.get('dtype', ''))}"],
        _md_table(cols, rows),
    )


def _model_text(data: dict) -> str:
    config = data.get("config", {})
    bits = [f"{data.get('tokens', '?')} tokens"]
    if data.get("latent"):
        bits.append("latent " + " x ".join(str(x) for x in data["latent"]))
    if config:
        bits.append(
            f"{config.get('num_layers')} layers, {config.get('num_attention_heads')} heads of "
            f"{config.get('attention_head_dim')}, ffn {config.get('ffn_dim')}"
        )
    if data.get("dtype"):
        bits.append(str(data["dtype"]).removeprefix("torch."))
    return "- Model: `WanTransformer3DModel`, random weights; " + ", ".join(bits)


def _render_wan_step(results: list[BenchResult]) -> str:
    """Old files have one eager row per backend and ``speedup vs default``; newer ones a ``mode``
    per row and the speedups over the default eager and compiled step of the same run."""
    (result,) = results
    data = result.data
    rows = data["rows"]
    modes = [m for m in ("eager", "compiled") if any(r.get("mode", "eager") == m for r in rows)]
    cols = ["backend"] + (["mode"] if len(modes) > 1 else []) + ["ms per step"]
    cols += [f"speedup vs default {m}" for m in modes] + ["rel_l2 vs unpatched eager"]
    table = []
    for r in rows:
        line = [_backend_cell(r["backend"])]
        if len(modes) > 1:
            line.append(r.get("mode", "eager"))
        line.append("failed: " + r.get("error", "") if r.get("ms") is None else _fmt(r["ms"], 1))
        for mode in modes:
            line.append(r.get(f"speedup vs default {mode}", r.get("speedup vs default", "-")))
        line.append(r.get("rel_l2", "-"))
        table.append(line)
    timing = f"Median of {data.get('repeat', 5)} steps after {data.get('warmup', 2)} warm-ups"
    if len(modes) > 1:
        timing += "; compiled: `compile_repeated_blocks(fullgraph=True)`"
    return _entry(
        f"Wan2.1-1.3B transformer step (`{result.path.name}`)",
        results,
        [_model_text(data), f"- {timing}"],
        _md_table(cols, table),
    )


def _render_cp_wan(results: list[BenchResult]) -> str:
    (result,) = results
    data = result.data
    cols = ["layout", "GPUs", "ms per step", "efficiency", "speedup vs 1-GPU default", "rel_l2 vs 1 GPU"]
    rows = [
        [
            r["layout"],
            str(r["ranks"]),
            _fmt(r["ms"], 1),
            _fmt(r["efficiency"]),
            f"{_fmt(r['speedup vs default'])}x",
            r["rel_l2"],
        ]
        for r in data["rows"]
    ]
    details = [
        _model_text(data),
        f"- {data.get('collective', '?').upper()}; median of {data.get('repeat')} steps after "
        f"{data.get('warmup')} warm-up, slowest rank; rel_l2 of every rank's gathered output against "
        f"the 1-GPU default step (tolerance {data.get('tol')}); efficiency = t1(fa) / (N x tN)",
    ]
    return _entry(
        f"Context-parallel Wan2.1-1.3B step on {data.get('world_size')} GPUs (`{result.path.name}`)",
        results,
        details,
        _md_table(cols, rows),
    )


def _render_rows(results: list[BenchResult], leading: list[str] | None = None) -> str:
    """A table of every row's keys as they are (scripts whose rows are already what to show);
    ``leading`` file-level fields come first, one value per file."""
    leading = leading or []
    columns = list(dict.fromkeys(k for r in results for row in r.data["rows"] for k in row))
    table = [
        [str(r.data.get(k, "-")) for k in leading] + [str(row.get(k, "-")) for k in columns]
        for r in results
        for row in r.data["rows"]
    ]
    return _md_table(leading + columns, table)


def _render_row_balance(results: list[BenchResult]) -> str:
    (result,) = results
    grid = result.data.get("grid")
    return _entry(
        f"Dense-row split, block-sparse kernel only (`{result.path.name}`)",
        results,
        [f"- Grid {tuple(grid) if grid else '?'}; ms per kernel call, selection excluded"],
        _render_rows(results),
    )


def _render_oracle(results: list[BenchResult]) -> str:
    results = sorted(results, key=lambda r: r.data.get("sparsity", 0))
    first = results[0].data
    return _entry(
        "128-token block selection against exact-mass references",
        results,
        [
            f"- Grid {tuple(first.get('grid', ()))}, {first.get('heads')} heads; kept = fraction of "
            "block pairs kept, mass kept = attention mass inside them, rel_l2 against dense"
        ],
        _render_rows(results, ["sparsity"]),
    )


def _render_selection_quality(results: list[BenchResult]) -> str:
    (result,) = results
    data = result.data
    mass_rows = data.get("mass_rows") or []
    mass_table = _md_table(
        list(mass_rows[0]) if mass_rows else [], [[str(v) for v in row.values()] for row in mass_rows]
    )
    details = [
        f"- Grid {tuple(data.get('grid', ()))}, {data.get('heads')} heads of {data.get('head_dim')}, "
        "float32, raster order; kept = fraction of block pairs kept, mass kept = exact attention mass "
        "inside them, rel_l2 and cos against dense attention, vs row oracle = rel_l2 over the row "
        "oracle's"
    ]
    table = _render_rows(results)
    if mass_rows:
        table += (
            "\n\n`mass` budgets (sparsity reached = mean over heads; the other columns at that sparsity):\n\n"
        )
        table += mass_table
    return _entry(
        f"Block selection against the exact-mass ranking (`{result.path.name}`)", results, details, table
    )


def _render_block_sparse_kernel(results: list[BenchResult]) -> str:
    (result,) = results
    data = result.data
    details = [
        f"- Shape {_shape_text(data.get('shape'))}, triton {data.get('triton', '?')}; {data.get('note', '')}"
    ]
    return _entry(
        f"Block-sparse kernel: Triton against FlexAttention and cuDNN (`{result.path.name}`)",
        results,
        details,
        _render_rows(results),
    )


def _render_qwen_image_padding(results: list[BenchResult]) -> str:
    (result,) = results
    data = result.data
    details = [
        f"- {data.get('layers')} layers at full width, {data.get('image_tokens')} image tokens, "
        f"{data.get('text_tokens')} text tokens of which {data.get('padded_text_tokens')} padded; ms per "
        "transformer call, rel_l2 against the unpatched model on the same input"
    ]
    if data.get("pairs"):
        details.append(
            "- `two`: two unpadded prompts; `mixed`: the same two, the second with the padded tokens"
        )
    return _entry(
        f"Qwen-Image with a padded text mask (`{result.path.name}`)", results, details, _render_rows(results)
    )


#: kind -> (renderer, whether all files of the kind make one entry). The order is the docs' order.
RENDERERS: dict[str, tuple[Callable[[list[BenchResult]], str], bool]] = {
    "dense": (_render_dense, False),
    "sparse": (_render_sparse, False),
    "block_sparse_kernel": (_render_block_sparse_kernel, False),
    "vsa": (_render_vsa, True),
    "wan_step": (_render_wan_step, False),
    "cp_wan": (_render_cp_wan, False),
    "row_balance": (_render_row_balance, False),
    "oracle": (_render_oracle, True),
    "selection_quality": (_render_selection_quality, False),
    "qwen_image_padding": (_render_qwen_image_padding, False),
}


# ----------------------------------------------------------------------------------------------
# The section, the plot


def speedup_points(results: list[BenchResult]) -> dict[str, list[tuple[float, float]]]:
    """Speedup over dense cuDNN per backend, as ``(sparsity, speedup)`` sorted by sparsity."""
    points: dict[str, list[tuple[float, float]]] = {}
    for result in results:
        if result.kind == "sparse":
            for row in result.data["results"]:
                points.setdefault(row["backend"], []).append(
                    (float(row["sparsity"]), float(row["speedup_vs_dense"]))
                )
        elif result.kind == "vsa":
            totals = _vsa_total(result.data)
            if totals:
                points.setdefault("vsa", []).append((float(result.data["sparsity"]), totals[0] / totals[1]))
    return {backend: sorted(values) for backend, values in points.items()}


def render_bench_section(results_dir: Path | None = None) -> str:
    """The generated part of docs/benchmarks.md: one entry per result file (files of a grouped kind
    together), in the order of :data:`RENDERERS`, then a speedup summary and the plot when
    ``speedup_vs_sparsity.png`` exists."""
    results_dir = Path(results_dir or ROOT / BENCH_DIR)
    results = load_results(results_dir) if results_dir.is_dir() else []
    parts = [
        BENCH_BEGIN,
        f"<!-- Generated from {BENCH_DIR}/*.json by `{REGENERATE}`; edit outside the markers. -->\n",
        "## Results (generated)\n",
        "One entry per result file: the device, software, date and command of the run, then its numbers.\n",
    ]
    if not results:
        parts.append(f"No results in `{BENCH_DIR}/` yet: run `make bench` on a GPU.\n")
    for kind, (render, grouped) in RENDERERS.items():
        of_kind = [r for r in results if r.kind == kind]
        for group in [of_kind] if grouped and of_kind else [[r] for r in of_kind]:
            parts.append(render(group) + "\n")
    points = speedup_points(results)
    if points:
        sparsities = sorted({s for values in points.values() for s, _ in values})
        rows = [
            [f"`{b}`", *(next((f"{x:.2f}x" for s, x in values if s == sp), "-") for sp in sparsities)]
            for b, values in points.items()
        ]
        parts.append("### Speedup over dense cuDNN SDPA (1.0x) by sparsity, per attention call\n")
        parts.append(_md_table(["backend", *(f"{s:g}" for s in sparsities)], rows) + "\n")
        if (results_dir / PLOT_NAME).exists():
            parts.append(f"![speedup vs sparsity]({Path(BENCH_DIR).name}/{PLOT_NAME})\n")
    parts.append(BENCH_END)
    return "\n".join(parts)


def replace_bench_section(text: str, section: str) -> str:
    """``text`` with the marked section replaced (appended when there are no markers yet)."""
    begin, end = text.find(BENCH_BEGIN), text.find(BENCH_END)
    if begin == -1 or end == -1:
        return text.rstrip("\n") + "\n\n" + section + "\n"
    return text[:begin] + section + text[end + len(BENCH_END) :]


def rendered_docs(results_dir: Path, docs_path: Path) -> str:
    """What ``docs_path`` should hold: its hand-written text with the section rendered afresh."""
    text = docs_path.read_text() if docs_path.exists() else "# Benchmarks\n"
    return replace_bench_section(text, render_bench_section(results_dir))


def write_docs(results_dir: Path, docs_path: Path) -> bool:
    """Rewrite the section of ``docs_path``; True when it changed."""
    text = rendered_docs(results_dir, docs_path)
    if docs_path.exists() and docs_path.read_text() == text:
        return False
    docs_path.parent.mkdir(parents=True, exist_ok=True)
    docs_path.write_text(text)
    print(f"wrote {docs_path}")
    return True


def write_plot(results_dir: Path) -> Path | None:
    """Speedup vs sparsity per backend, dense cuDNN SDPA = 1.0; None (with a message) without
    matplotlib or without sparse results."""
    results = load_results(results_dir)
    points = speedup_points(results)
    if not points:
        print("no sparse or VSA results: no plot")
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return None
    devices = sorted({r.device for r in results if r.kind in ("sparse", "vsa")})
    fig, ax = plt.subplots(figsize=(6, 4))
    for backend, values in points.items():
        ax.plot([s for s, _ in values], [x for _, x in values], marker="o", label=backend)
    ax.axhline(1.0, color="gray", linestyle="--", label="dense cuDNN SDPA")
    ax.set_xlabel("sparsity")
    ax.set_ylabel("speedup over dense cuDNN SDPA")
    ax.set_title(f"Sparse attention vs dense cuDNN SDPA ({', '.join(devices)})")
    ax.legend()
    ax.grid(alpha=0.3)
    path = Path(results_dir) / PLOT_NAME
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", default=str(ROOT / BENCH_DIR), help=f"JSON folder (default {BENCH_DIR})")
    parser.add_argument(
        "--docs", default=str(ROOT / DOCS_PATH), help=f"markdown to update (default {DOCS_PATH})"
    )
    parser.add_argument("--check", action="store_true", help="only report whether the section is stale")
    parser.add_argument("--plot", action="store_true", help=f"also redraw {PLOT_NAME} (needs matplotlib)")
    args = parser.parse_args(argv)
    results_dir, docs_path = Path(args.results), Path(args.docs)
    if args.check:
        stale = not docs_path.exists() or docs_path.read_text() != rendered_docs(results_dir, docs_path)
        if stale:
            print(f"stale: {docs_path} (regenerate with `{REGENERATE}`)")
        return 1 if stale else 0
    if args.plot:
        write_plot(results_dir)
    write_docs(results_dir, docs_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
