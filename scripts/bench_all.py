"""Every benchmark from one GPU run, then the results section of docs/benchmarks.md and the plot.

Runs ``scripts/bench_dense.py`` and ``scripts/bench_sparse.py`` (block_sparse, rain_fusion and vsa
per call) one after the other, each writing its JSON into ``--out-dir``; then
``scripts/bench_report.py`` regenerates the section between ``<!-- bench:begin -->`` and
``<!-- bench:end -->`` of docs/benchmarks.md (text outside the markers is kept) and
``speedup_vs_sparsity.png`` (speedup over dense cuDNN SDPA per backend; needs matplotlib, else
skipped with a message).

    python scripts/bench_all.py                          # on the GPU: everything, into docs/bench_results
    python scripts/bench_all.py --only sparse            # a subset
    python scripts/bench_all.py --small                  # CPU smoke run into a scratch folder
    python scripts/bench_all.py --from-json DIR          # no runs: copy DIR/*.json in, regenerate docs + plot
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench_report import BENCH_DIR, write_docs, write_plot  # noqa: E402

SCRIPTS = ROOT / "scripts"


def device_tag(small: bool) -> str:
    """Short device name for file names: ``h200`` for "NVIDIA H200", ``cpu-smoke`` for --small."""
    import torch

    if small or not torch.cuda.is_available():
        return "cpu-smoke"
    name = torch.cuda.get_device_name().lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def planned_runs(args, out_dir: Path, tag: str) -> list[tuple[str, list[str]]]:
    """(label, command) of every benchmark to run, in order."""
    small = ["--small"] if args.small else []
    runs = []
    if "dense" in args.only:
        runs.append(("dense", ["bench_dense.py", "--out", str(out_dir / f"dense_{tag}.json"), *small]))
    if "sparse" in args.only:
        runs.append(("sparse", ["bench_sparse.py", "--out", str(out_dir / f"sparse_{tag}.json"), *small]))
    return [(label, [sys.executable, str(SCRIPTS / cmd[0]), *cmd[1:]]) for label, cmd in runs]


def _progress(items, **kwargs):
    """A tqdm bar when tqdm is installed and stderr is a terminal, else the plain items."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items, print
    if not sys.stderr.isatty():
        return items, print
    bar = tqdm(items, **kwargs)
    return bar, tqdm.write


def run_all(runs: list[tuple[str, list[str]]]) -> list[str]:
    """Run each benchmark, streaming its output; returns the labels of those that failed."""
    failed = []
    bar, write = _progress(runs, desc="benchmarks", unit="run", file=sys.stderr)
    for label, command in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(label)
        write(f"\n=== {label}: {' '.join(command[1:])}")
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for line in process.stdout:
            write(line.rstrip("\n"))
        if process.wait() != 0:
            failed.append(label)
            write(f"=== {label} FAILED (exit {process.returncode})")
    return failed


def import_json(source: Path, out_dir: Path) -> None:
    """Copy the JSON results of ``source`` into ``out_dir`` (the docs cite files in the repository)."""
    if not source.is_dir():
        raise SystemExit(f"--from-json: {source} is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    if source.resolve() == out_dir.resolve():
        return
    for path in sorted(source.glob("*.json")):
        shutil.copy2(path, out_dir / path.name)
        print(f"copied {path} -> {out_dir / path.name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out-dir", default=None, help=f"JSON results (default {BENCH_DIR}; --small: a temp dir)"
    )
    parser.add_argument("--docs", default=None, help="markdown to update (default docs/benchmarks.md)")
    parser.add_argument("--tag", default=None, help="device tag in file names (default from the GPU name)")
    parser.add_argument("--only", nargs="+", choices=("dense", "sparse"), default=("dense", "sparse"))
    parser.add_argument("--small", action="store_true", help="CPU smoke run of every script at tiny shapes")
    parser.add_argument(
        "--from-json", default=None, metavar="DIR", help="only regenerate docs + plot from DIR"
    )
    args = parser.parse_args(argv)

    if args.out_dir:
        out_dir = Path(args.out_dir)
    elif args.small:
        out_dir = Path(tempfile.mkdtemp(prefix="attnbridge-bench-"))
    else:
        out_dir = ROOT / BENCH_DIR
    docs_path = (
        Path(args.docs)
        if args.docs
        else (out_dir / "benchmarks.md" if args.small else ROOT / "docs/benchmarks.md")
    )

    failed = []
    if args.from_json:
        import_json(Path(args.from_json), out_dir)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        failed = run_all(planned_runs(args, out_dir, args.tag or device_tag(args.small)))
    write_plot(out_dir)
    write_docs(out_dir, docs_path)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
