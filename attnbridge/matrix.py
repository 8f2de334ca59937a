"""``attnbridge matrix``: every backend x model family x platform of the support table, run.

Each *model cell* builds a tiny real model of the family (1 layer, random weights, the builders of
``tiny_models``), runs it unpatched, patches it with the backend through ``enable_npu_attention``
and compares the outputs (relative L2, tolerance per backend and dtype: :data:`TOLERANCE`). It also
checks that each attention kind went to the backend the table says (sparse backends hand
cross-attention to a dense one). A cell the table marks unsupported must raise the documented error
type with the table's reason in its message, at the documented stage.

Each *input cell* checks one refusal an impl declares in its attributes (a dtype, a head size, the
LSE, causal) on a small ``attend``-style call.

Platforms: the CPU runs natively; the NPU runs through the CPU emulation of torch_npu and the
sgl-kernel-npu ``attentions`` ops in ``tests/emulation`` (installed the way the ``fake_npu``
fixture does) unless a real NPU is present; CUDA and MUSA cannot be emulated on a CPU, so their
supported cells are "not run" without the device, while their refusals (raised before any kernel
runs) are still checked with CPU tensors and the platform forced.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import logging
import math
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from attnbridge.attention.api import AttentionLayer, _shared_layer
from attnbridge.attention.contract import AttentionImpl, default_scale
from attnbridge.attention.registry import BACKENDS
from attnbridge.errors import BackendUnavailableError
from attnbridge.platforms import get_platform
from attnbridge.support import PLATFORM_FACTS, ModelSupport, SupportTable, kernel_support, support_table

#: Relative L2 error of the model output against its reference, per backend and model dtype.
#: float32: dense kernels differ from the unpatched model only in summation order (measured
#: <= 3e-7); sparse backends run at sparsity 0, where they must keep every block (measured
#: <= 2e-7). bfloat16 (NPU kernels that refuse float32): one bf16 rounding is 0.4%, and patched and
#: unpatched round at different points (measured <= 4e-3).
DENSE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
TOLERANCE: dict[str, dict[torch.dtype, float]] = {
    "sdpa": DENSE_TOLERANCE,
    "fa": DENSE_TOLERANCE,
    "sage": DENSE_TOLERANCE,  # runs its fa fallback here (sageattention needs a GPU)
    "laser": DENSE_TOLERANCE,  # tiny sequences (< 2048 tokens) take laser's dense path
    "block_sparse": DENSE_TOLERANCE,  # sparsity 0
    "rain_fusion": DENSE_TOLERANCE,  # sparsity 0
    "vsa": DENSE_TOLERANCE,  # sparsity 0, against dense + VSA's coarse term (see vsa_reference)
}
#: Options each backend runs with in a model cell: sparse backends at sparsity 0, where the exact
#: dense result is the reference.
CELL_OPTIONS: dict[str, dict[str, Any]] = {
    name: ({"sparsity": 0.0} if spec.sparse else {}) for name, spec in BACKENDS.items()
}
#: Head size of the tiny models: one every kernel accepts (the NPU sparse kernels and vsa list theirs).
HEAD_DIM = 64

_MODEL_FAMILY_INPUTS = {"wan": "wan_inputs", "qwen_image": "qwen_image_inputs"}


# ----------------------------------------------------------------------------------------------
# Cells and results


@dataclass(frozen=True)
class Cell:
    """One check: a model cell (``family`` set) or an input cell (``check`` set)."""

    backend: str
    platform: str
    family: str | None = None
    check: str | None = None

    @property
    def id(self) -> str:
        return "-".join(x for x in (self.platform, self.family or "input", self.backend, self.check) if x)


@dataclass
class CellResult:
    """``status``: ``ok`` (ran and matched), ``refused`` (raised the documented error), ``not run``
    (with why) or ``FAIL`` (with what went wrong)."""

    cell: Cell
    status: str
    detail: str = ""
    short: str = ""

    @property
    def passed(self) -> bool:
        return self.status != "FAIL"


def model_cells(table: SupportTable) -> list[Cell]:
    return [Cell(m.backend, m.platform, family=m.family.name) for m in table.models()]


def input_cells(table: SupportTable) -> list[Cell]:
    """One cell per refusal an impl declares: each refused dtype, one refused head size, LSE, causal."""
    cells = []
    for kernel in table.kernels():
        effective = kernel.effective
        if effective.impl is None:
            continue
        checks = [f"dtype-{str(d).removeprefix('torch.')}" for d in effective.refused_dtypes()]
        if effective.head_sizes is not None:
            checks.append(f"head-size-{_refused_head_size(effective.head_sizes)}")
        if not effective.lse:
            checks.append("lse")
        if not effective.causal:
            checks.append("causal")
        cells.extend(Cell(kernel.backend, kernel.platform, check=c) for c in checks)
    return cells


def all_cells(table: SupportTable | None = None) -> list[Cell]:
    table = table or support_table()
    return model_cells(table) + input_cells(table)


def _refused_head_size(allowed: tuple[int, ...]) -> int:
    return next(size for size in (16, 48, 80, 256) if size not in allowed)


# ----------------------------------------------------------------------------------------------
# Platforms here: native, emulated (NPU) or absent


@contextlib.contextmanager
def emulated_npu() -> Iterator[types.ModuleType]:
    """The emulated Ascend packages of ``tests/emulation`` (as the ``fake_npu`` fixture installs
    them) for the block, with attnbridge's cached layers cleared on both sides."""
    from tests.emulation.install import installed_fake_npu

    _shared_layer.cache_clear()
    try:
        with installed_fake_npu() as fake:
            yield fake
    finally:
        _shared_layer.cache_clear()


def emulation_available() -> bool:
    try:
        importlib.import_module("tests.emulation.fake_torch_npu")
    except ImportError:
        return False
    return True


def platform_mode(platform: str) -> str:
    """``native`` (the device is here), ``emulated`` (NPU through tests/emulation) or ``absent``."""
    if platform == "cpu" or get_platform(platform).is_present():
        return "native"
    if PLATFORM_FACTS[platform].mode == "emulated" and emulation_available():
        return "emulated"
    return "absent"


@contextlib.contextmanager
def platform_context(platform: str, mode: str) -> Iterator[types.ModuleType | None]:
    if mode == "emulated":
        with emulated_npu() as fake:
            yield fake
    else:
        yield None


def device_for(platform: str, mode: str) -> torch.device:
    return torch.device(get_platform(platform).device_type if mode == "native" else "cpu")


# ----------------------------------------------------------------------------------------------
# Tiny models


def tiny_models_module() -> types.ModuleType:
    """``attnbridge.tiny_models`` when it exists, else the test suite's ``tests.tiny_models``."""
    try:
        return importlib.import_module("attnbridge.tiny_models")
    except ModuleNotFoundError:
        return importlib.import_module("tests.tiny_models")


def _build(builder, head_dim: int, **kwargs):
    """Call ``builder`` with ``head_dim`` if it takes one, else ``None`` (the caller rescales)."""
    params = inspect.signature(builder).parameters
    if "head_dim" in params:
        return builder(head_dim=head_dim, **{k: v for k, v in kwargs.items() if k in params})
    return None


def build_tiny_model(family: str, head_dim: int = HEAD_DIM) -> torch.nn.Module:
    """One-layer tiny model of ``family`` with ``head_dim``-sized heads, from the tiny-model builders'
    configs (their head sizes, 12 and 16, are below what the NPU sparse kernels and vsa accept)."""
    tm = tiny_models_module()
    torch.manual_seed(0)
    if family == "wan":
        model = _build(tm.tiny_wan_transformer, head_dim, layers=1)
        if model is None:
            base = tm.tiny_wan_transformer(layers=1)
            model = type(base).from_config({**base.config, "attention_head_dim": head_dim})
    elif family == "qwen_image":
        model = _build(tm.tiny_qwen_image_transformer, head_dim, layers=1)
        if model is None:
            base = tm.tiny_qwen_image_transformer(layers=1)
            axes = tuple(base.config.axes_dims_rope)
            rope = tuple(a * head_dim // sum(axes) for a in axes)
            model = type(base).from_config(
                {**base.config, "attention_head_dim": head_dim, "axes_dims_rope": rope}
            )
    elif family == "qwen3_moe":
        model = _build(tm.tiny_qwen3_moe, head_dim, layers=1)
        if model is None:
            base = tm.tiny_qwen3_moe()
            config = copy.deepcopy(base.config)
            config.head_dim, config.num_hidden_layers = head_dim, 1
            torch.manual_seed(0)
            model = type(base)(config)
            model.set_attn_implementation("sdpa")
    else:
        raise ValueError(f"no tiny model for family {family!r}")
    return model.eval()


def tiny_inputs(family: str) -> dict[str, Any]:
    if family == "qwen3_moe":
        return {"input_ids": torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(1))}
    return getattr(tiny_models_module(), _MODEL_FAMILY_INPUTS[family])()


def _cast(value: Any, dtype: torch.dtype, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    return value


@torch.no_grad()
def run_model(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    if "input_ids" in inputs:
        return model(**inputs).logits
    return model(**inputs, return_dict=False)[0]


class ModelPool:
    """Tiny models, their inputs and unpatched outputs, built once per (family, dtype, device)."""

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[torch.nn.Module, dict, torch.Tensor]] = {}

    def get(self, family: str, dtype: torch.dtype, device: torch.device):
        key = (family, dtype, str(device))
        if key not in self._entries:
            with _quiet():
                model = build_tiny_model(family).to(device=device, dtype=dtype)
            inputs = {k: _cast(v, dtype, device) for k, v in tiny_inputs(family).items()}
            self._entries[key] = (model, inputs, run_model(model, inputs))
        return self._entries[key]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence attnbridge's and diffusers' warnings (fallbacks, sparsity 0, dtype casts) in a cell."""
    for library in ("diffusers", "transformers"):  # they set their loggers' level on first import
        with contextlib.suppress(ImportError):
            importlib.import_module(library)
    loggers = [logging.getLogger(name) for name in ("attnbridge", "diffusers", "transformers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# ----------------------------------------------------------------------------------------------
# References


def vsa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid, scale: float) -> torch.Tensor:
    """VSA with every tile kept: exact attention plus the coarse term, the softmax attention between
    4x4x4-tile means broadcast to each token of the query tile. Written here from that definition
    (float32), independently of the backend's tiling code."""
    from attnbridge.attention.backends.fa import reference_attention

    frames, height, width = grid
    t, h, w = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    tiles_h, tiles_w = math.ceil(height / 4), math.ceil(width / 4)
    tile = (((t // 4) * tiles_h + h // 4) * tiles_w + w // 4).flatten().to(q.device)
    n_tiles = math.ceil(frames / 4) * tiles_h * tiles_w
    counts = torch.bincount(tile, minlength=n_tiles).float()[None, :, None, None]

    def pool(x):
        sums = torch.zeros(x.shape[0], n_tiles, *x.shape[2:], device=x.device).index_add_(1, tile, x.float())
        return sums / counts

    groups = q.shape[2] // k.shape[2]
    q_bar, k_bar, v_bar = pool(q), pool(k).repeat_interleave(groups, 2), pool(v).repeat_interleave(groups, 2)
    probs = torch.softmax(torch.einsum("bihd,bjhd->bhij", q_bar, k_bar) * scale, dim=-1)
    coarse = torch.einsum("bhij,bjhd->bihd", probs, v_bar)
    dense = reference_attention(q, k, v, causal=False, scale=scale, return_lse=False).float()
    return (dense + coarse[:, tile]).to(q.dtype)


@contextlib.contextmanager
def _layer_calls(calls: list, substitute=None) -> Iterator[None]:
    """Record ``(context kind, backend)`` of every AttentionLayer call; ``substitute(layer, q, k, v,
    kwargs)`` may return an output to use instead of the layer's."""
    original = AttentionLayer.__call__

    def wrapped(self, q, k, v, **kwargs):
        context = kwargs.get("context")
        calls.append((getattr(context, "kind", None), self.backend))
        if substitute is not None:
            out = substitute(self, q, k, v, kwargs)
            if out is not None:
                return out
        return original(self, q, k, v, **kwargs)

    AttentionLayer.__call__ = wrapped
    try:
        yield
    finally:
        AttentionLayer.__call__ = original


def _vsa_substitute(layer, q, k, v, kwargs):
    context = kwargs.get("context")
    if context is None or context.kind == "cross" or context.grid is None or q.shape[1] != k.shape[1]:
        return None
    return vsa_reference(q, k, v, context.grid, default_scale(q.shape[-1], kwargs.get("scale")))


def _rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm())


# ----------------------------------------------------------------------------------------------
# Running cells


def _error_matches(error: BaseException, refusal) -> bool:
    return isinstance(error, refusal.error) and refusal.reason in str(error)


def _describe_error(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error)[:300]}"


def _cell_dtype(impls: list[type[AttentionImpl]]) -> torch.dtype:
    """float32 when every kernel of the cell takes it, else bfloat16."""
    if all(torch.float32 in impl.supported_dtypes for impl in impls):
        return torch.float32
    return torch.bfloat16


def _check_refusal(support: ModelSupport, pool: ModelPool, device: torch.device) -> tuple[str, str]:
    from attnbridge.enable import disable_npu_attention, enable_npu_attention

    refusal = support.refusal
    model, inputs, _ = pool.get(support.family.name, torch.float32, device)
    options = CELL_OPTIONS[support.backend]
    stage = "enable"
    try:
        enable_npu_attention(model, support.backend, platform=support.platform, **options)
        stage = "call"
        run_model(model, inputs)
    except Exception as error:  # the documented refusal, or a failure to report
        if not _error_matches(error, refusal):
            return "FAIL", f"expected {refusal.error.__name__} containing {refusal.reason!r}, got " + (
                _describe_error(error)
            )
        if stage != refusal.stage:
            return "FAIL", f"refused at {stage}, the table says at {refusal.stage}: {error}"
        return "refused", f"{type(error).__name__} at {stage}: {refusal.reason}"
    finally:
        disable_npu_attention(model)
    return "FAIL", f"expected {refusal.error.__name__} ({refusal.reason}); it ran"


def _strict_refuses_fallback(support: ModelSupport, model) -> str | None:
    """For a backend the table says always falls back here: ``strict=True`` must refuse with the
    table's reason. Returns what went wrong, or None."""
    from attnbridge.enable import enable_npu_attention

    main = support.main
    try:
        handle = enable_npu_attention(
            model, support.backend, platform=support.platform, strict=True, **CELL_OPTIONS[support.backend]
        )
    except BackendUnavailableError as error:
        return None if main.never_runs in str(error) else f"strict=True refused with another reason: {error}"
    handle.disable()
    return "strict=True should refuse: the table says this backend always falls back here"


def _expected_output(support: ModelSupport, model, inputs, unpatched: torch.Tensor) -> torch.Tensor:
    """The unpatched output, except for vsa: the model with :func:`vsa_reference` as its self-attention."""
    if support.backend != "vsa":
        return unpatched
    from attnbridge.enable import enable_npu_attention

    with _layer_calls([], _vsa_substitute):
        handle = enable_npu_attention(model, "fa", platform=support.platform)
        try:
            return run_model(model, inputs)
        finally:
            handle.disable()


def _check_kernels(support: ModelSupport, resolved: dict[str, type], ran: list[str]) -> str | None:
    """The kernels that ran are the ones the platform resolves, and those are the table's (unless a
    package is missing here and the table names the fallback). Returns what went wrong, or None."""
    for name, impl in resolved.items():
        kernel = kernel_support(name, support.platform).effective
        if impl.__name__ != kernel.impl_name and not (kernel.kernel.fallback and kernel.install):
            return f"{name!r} resolved to {impl.__name__}, the table says {kernel.impl_name}"
    if set(ran) != {impl.__name__ for impl in resolved.values()}:
        return f"kernels {ran} ran, resolution gave {sorted(c.__name__ for c in resolved.values())}"
    return None


def _run_supported(
    support: ModelSupport, pool: ModelPool, device: torch.device, fake
) -> tuple[str, str, str]:
    """Patch, run, compare; ``(status, detail, short)``."""
    from attnbridge.enable import enable_npu_attention

    platform = get_platform(support.platform)
    resolved = {kind.served_by: platform.resolve(kind.served_by) for kind in support.kinds}
    dtype = _cell_dtype(list(resolved.values()))
    model, inputs, unpatched = pool.get(support.family.name, dtype, device)
    main = support.main
    problem = _strict_refuses_fallback(support, model) if main.status == "fallback" else None
    if problem:
        return "FAIL", problem, ""
    expected = _expected_output(support, model, inputs, unpatched)

    calls: list = []
    if fake is not None:
        fake.calls.clear()
    handle = enable_npu_attention(
        model,
        support.backend,
        platform=support.platform,
        strict=main.kernel.fallback is None,
        **CELL_OPTIONS[support.backend],
    )
    try:
        with _layer_calls(calls):
            out = run_model(model, inputs)
        ran = sorted(
            {type(impl).__name__ for layer in handle.layers.values() for impl in layer._impls.values()}
        )
    finally:
        handle.disable()

    routed = set(calls)
    wanted = {(kind.kind, kind.served_by) for kind in support.kinds}
    if routed != wanted:
        return "FAIL", f"attention kinds went to {sorted(routed)}, the table says {sorted(wanted)}", ""
    problem = _check_kernels(support, resolved, ran)
    if problem:
        return "FAIL", problem, ""
    if fake is not None and not fake.calls:
        return "FAIL", "no emulated NPU op was called: the NPU path did not run", ""
    error = _rel_l2(out, expected)
    tolerance = TOLERANCE[support.backend][dtype]
    ops = f"; ops {sorted({name for name, _, _ in fake.calls})}" if fake is not None else ""
    dtype_name = str(dtype).removeprefix("torch.")
    short = f"{error:.0e}" + ("*" if main.status == "fallback" else "")
    if not error <= tolerance:
        return "FAIL", f"rel-L2 {error:.1e} > {tolerance:.0e} ({dtype_name}); kernels {ran}{ops}", short
    return "ok", f"rel-L2 {error:.1e} <= {tolerance:.0e} ({dtype_name}); kernels {ran}{ops}", short


def _run_model_cell(cell: Cell, table: SupportTable, pool: ModelPool) -> CellResult:
    support = table.model(cell.backend, cell.family, cell.platform)
    mode = platform_mode(cell.platform)
    if support.supported and mode == "absent":
        return CellResult(cell, "not run", PLATFORM_FACTS[cell.platform].not_run)
    with platform_context(cell.platform, mode if mode != "absent" else "native") as fake, _quiet():
        device = device_for(cell.platform, mode)
        try:
            if not support.supported:
                status, detail = _check_refusal(
                    support, pool, torch.device("cpu") if mode == "absent" else device
                )
                if mode == "absent":
                    detail += " (CPU tensors, platform forced)"
                return CellResult(cell, status, detail)
            status, detail, short = _run_supported(support, pool, device, fake)
            return CellResult(cell, status, detail, short)
        except Exception as error:  # a cell that crashes is a failed cell, not a crashed matrix
            return CellResult(cell, "FAIL", _describe_error(error))


_INPUT_MESSAGES = {
    "dtype": "does not support dtype {}",
    "head-size": "does not support head size {}",
    "lse": "cannot return the softmax LSE",
    "causal": "does not support causal attention",
}


def _run_input_cell(cell: Cell) -> CellResult:
    """The declared refusal, raised as a ValueError naming it on a small call (before any kernel
    runs, so absent platforms are checked with CPU tensors and the platform forced)."""
    check, _, value = cell.check.partition("-")
    if check == "head":
        check, value = "head-size", cell.check.removeprefix("head-size-")
    kernel = kernel_support(cell.backend, cell.platform)
    mode = platform_mode(cell.platform)
    dtype = getattr(torch, value) if check == "dtype" else None
    if dtype is None:
        dtype = torch.float32 if torch.float32 in kernel.effective.dtypes else torch.bfloat16
    head = int(value) if check == "head-size" else HEAD_DIM
    device = device_for(cell.platform, mode) if mode != "absent" else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 2, head, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
    expected = _INPUT_MESSAGES[check].format(value)
    with platform_context(cell.platform, mode if mode != "absent" else "native"), _quiet():
        try:
            # strict: a kernel's own refusals, not those of a fallback it would take without its package
            strict = kernel.status != "fallback"
            layer = AttentionLayer(
                cell.backend, platform=cell.platform, strict=strict, **CELL_OPTIONS[cell.backend]
            )
            layer(q, k, v, causal=check == "causal", return_lse=check == "lse")
        except BackendUnavailableError as error:
            if error.install:
                return CellResult(cell, "not run", f"needs {error.install}")
            return CellResult(cell, "FAIL", _describe_error(error))
        except ValueError as error:
            if expected in str(error):
                where = " (CPU tensors, platform forced)" if mode == "absent" else ""
                return CellResult(cell, "refused", f"ValueError: {expected}{where}")
            return CellResult(cell, "FAIL", f"expected {expected!r}, got {_describe_error(error)}")
        except Exception as error:
            return CellResult(cell, "FAIL", _describe_error(error))
    return CellResult(cell, "FAIL", f"expected ValueError {expected!r}; it ran")


def run_cell(cell: Cell, table: SupportTable | None = None, pool: ModelPool | None = None) -> CellResult:
    table = table or support_table()
    if cell.family is not None:
        return _run_model_cell(cell, table, pool or ModelPool())
    return _run_input_cell(cell)


# ----------------------------------------------------------------------------------------------
# Printing


@dataclass
class MatrixReport:
    results: list[CellResult] = field(default_factory=list)

    @property
    def failures(self) -> list[CellResult]:
        return [r for r in self.results if not r.passed]


def _cell_text(result: CellResult) -> str:
    if result.status == "ok":
        return f"ok {result.short}"
    return {"refused": "refused ok", "not run": "not run"}.get(result.status, "FAIL")


def format_report(report: MatrixReport, table: SupportTable, verbose: bool = False) -> str:
    by_cell = {r.cell: r for r in report.results}
    families = [f.name for f in table.families]
    lines = []
    for platform in table.platforms:
        mode = platform_mode(platform)
        lines.append(f"\n== {platform} ({mode}) ==  {PLATFORM_FACTS[platform].evidence}")
        lines.append(f"{'backend':<13}" + "".join(f"{f:<16}" for f in families) + "input refusals")
        for backend in table.backends:
            row = [_cell_text(by_cell[Cell(backend, platform, family=f)]) for f in families]
            inputs = [
                r
                for c, r in by_cell.items()
                if c.family is None and (c.backend, c.platform) == (backend, platform)
            ]
            summary = ", ".join(f"{r.cell.check} {_cell_text(r)}" for r in inputs) or "-"
            lines.append(f"{backend:<13}" + "".join(f"{t:<16}" for t in row) + summary)
        notes = {r.detail for r in report.results if r.cell.platform == platform and r.status == "not run"}
        lines.extend(f"   {note}" for note in sorted(notes))
    lines.append(
        "\nok <rel-L2>: patched tiny model vs its reference within TOLERANCE (* = served by the fallback); "
        "refused ok: raised the documented error"
    )
    shown = report.results if verbose else report.failures
    for result in shown:
        lines.append(f"{result.status:>7}  {result.cell.id}: {result.detail}")
    counts = {s: sum(r.status == s for r in report.results) for s in ("ok", "refused", "not run", "FAIL")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


def collect(table: SupportTable | None = None, progress: bool = True) -> MatrixReport:
    table = table or support_table()
    cells = all_cells(table)
    pool = ModelPool()
    iterator = cells
    if progress:
        try:
            from tqdm import tqdm

            iterator = tqdm(cells, desc="matrix", unit="cell", leave=False, file=sys.stderr)
        except ImportError:
            pass
    return MatrixReport([run_cell(cell, table, pool) for cell in iterator])


def run_matrix(verbose: bool = False) -> int:
    """Run every cell, print the matrix; exit code 1 when any cell failed."""
    table = support_table()
    report = collect(table, progress=sys.stderr.isatty())
    print(format_report(report, table, verbose=verbose))
    return 1 if report.failures else 0


__all__ = [
    "TOLERANCE",
    "Cell",
    "CellResult",
    "ModelPool",
    "all_cells",
    "collect",
    "run_cell",
    "run_matrix",
    "vsa_reference",
]
