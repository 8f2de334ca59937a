"""Timing and reporting helpers shared by the benchmark scripts (full shapes on a GPU, ``--small``
smoke runs on the CPU)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# Scripts run from a bare checkout too (``accelerate launch scripts/...`` without installing): every
# script imports this module first, so the repository root goes on the path here, once.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(1, _REPO_ROOT)

#: Wan2.1-T2V-1.3B transformer architecture (diffusers WanTransformer3DModel kwargs), for random weights.
WAN_1_3B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)


#: Qwen-Image transformer architecture (diffusers QwenImageTransformer2DModel kwargs): 60
#: double-stream blocks, 24 heads of 128, text width 3584, 2x2-packed 16-channel latents.
QWEN_IMAGE = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    axes_dims_rope=(16, 56, 56),
)


#: The row of the unpatched model in the scripts that time whole model calls.
DEFAULT = "diffusers default (unpatched)"


def parse_backend(text: str) -> tuple[str, dict]:
    """A ``--backends`` entry, ``name`` or ``name:sparsity``, as (backend, options). A bare
    transformer call has no step count, so sparse backends run sparse from the first call."""
    name, _, sparsity = text.partition(":")
    if not sparsity:
        return name, {}
    options = {"sparsity": float(sparsity)}
    if name in ("block_sparse", "rain_fusion"):
        options["skip_first_steps"] = 0
    return name, options


def add_timing_arguments(parser) -> None:
    """``--small``, ``--warmup``, ``--repeat`` and ``--out`` of the scripts that time a model call."""
    parser.add_argument("--small", action="store_true", help="tiny config on the CPU (smoke run)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=None, help="where to write the JSON results")


def model_device(small: bool) -> tuple[str, torch.dtype]:
    """The GPU in bf16 for a full run, the CPU in float32 for a ``--small`` one (or without a GPU)."""
    device = "cuda" if torch.cuda.is_available() and not small else "cpu"
    return device, torch.bfloat16 if device == "cuda" else torch.float32


def device_name(device: str | None = None) -> str:
    """The GPU's name, or the CPU's when ``device`` is ``"cpu"`` (a ``--small`` run on a host that has a GPU)."""
    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()})"


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def wall_ms(
    fn: Callable[[], object], *, warmup: int, repeat: int, before_each: Callable[[], object] | None = None
) -> float:
    """Median wall time of ``repeat`` calls in ms after ``warmup``, the device synchronised around
    each call; ``before_each`` runs untimed first (a barrier, so ranks start together)."""
    return interleaved_wall_ms({"": fn}, warmup=warmup, repeat=repeat, before_each=before_each)[""]


def interleaved_wall_ms(
    fns: dict[str, Callable[[], object]],
    *,
    warmup: int,
    repeat: int,
    before_each: Callable[[], object] | None = None,
) -> dict[str, float]:
    """Median wall time in ms of each of ``fns``, called in turn ``repeat`` times after ``warmup``
    rounds: the cases share the device's clock and thermal drift, so their ratios hold within a run."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            synchronize()
            if before_each is not None:
                before_each()
            start = time.perf_counter()
            fn()
            synchronize()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def median_ms(
    fn: Callable[[], object],
    *,
    warmup: int = 3,
    repeat: int = 10,
    bench_warmup_ms: int = 100,
    bench_rep_ms: int = 400,
) -> float:
    """Median time of ``fn`` in ms: on CUDA ``triton.testing.do_bench`` (device events, warm-up and
    repetitions in ms), else :func:`wall_ms`."""
    if torch.cuda.is_available():
        try:
            import triton.testing

            return float(
                triton.testing.do_bench(fn, warmup=bench_warmup_ms, rep=bench_rep_ms, return_mode="median")
            )
        except ImportError:
            pass
    return wall_ms(fn, warmup=warmup, repeat=repeat)


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


#: Environment variables that change what a run measures; recorded in the command when set.
RECORDED_ENV = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")


def command_line(argv: list[str] | None = None) -> str:
    """The command that ran this script, as a reader would type it from the repository root: the
    script's path relative to the root, the launcher (``torchrun`` / ``accelerate launch``) when
    there are several ranks, and the environment of :data:`RECORDED_ENV`. The docs quote it next to
    every result, so a number can be re-measured."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve() if argv else Path("?")
    try:
        script_text = str(script.relative_to(_REPO_ROOT))
    except ValueError:
        script_text = str(argv[0] if argv else script)
    words = ["python", script_text, *argv[1:]]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if any(name.startswith("ACCELERATE_") for name in os.environ):
            words = ["accelerate", "launch", "--num_processes", str(world), *words[1:]]
        else:
            words = ["torchrun", "--nproc_per_node", str(world), *words[1:]]
    env = [f"{name}={os.environ[name]}" for name in RECORDED_ENV if name in os.environ]
    return " ".join([*env, *(shlex.quote(w) for w in words)])


def write_json(path: str | None, payload: dict, *, kind: str) -> None:
    """Write one result file: ``kind`` (how ``scripts/bench_report.py`` renders it), the device,
    torch version, date and command, then the script's own ``payload``."""
    if not path:
        return
    payload = {
        "kind": kind,
        "device": device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": command_line(),
        **payload,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2))


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-+-".join("-" * widths[c] for c in columns))
    for row in rows:
        print(" | ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))
