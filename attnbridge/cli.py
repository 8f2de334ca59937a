"""The ``attnbridge`` command: ``backends`` (what runs here) and ``generate`` (a whole pipeline).
Every error a user can cause (a bad model, backend, option or device) is one ``error:`` line and
exit status 2."""

from __future__ import annotations

import argparse
import sys

from attnbridge.attention.registry import backends
from attnbridge.generation.options import OPTION_KEYS

PLATFORM_NAMES = {"cpu": "CPU", "npu": "Ascend NPU", "cuda": "CUDA GPU", "musa": "MUSA GPU"}


def describe(backend: str, platform: str) -> str:
    """What ``backend`` runs on ``platform`` in one line: the kernel, its packages, or why not."""
    from attnbridge.support import KernelSupport

    kernel = KernelSupport(backend, platform)
    if kernel.status == "no":
        return f"no: {kernel.unavailable}"
    if kernel.status == "fallback":
        return f"runs '{kernel.fallback}' instead: {kernel.never_runs}"
    needs = f" (needs: {'; '.join(kernel.install)})" if kernel.install else ""
    return f"{kernel.impl.description}{needs}"


def backends_command(args: argparse.Namespace) -> int:
    from attnbridge.attention.registry import kernel_for
    from attnbridge.errors import BackendUnavailableError
    from attnbridge.platforms import PLATFORM_ORDER, detect_platform

    here = detect_platform().name
    print(f"this machine: {PLATFORM_NAMES[here]} ({here}); CPU tensors always run on the cpu kernels")
    for name, spec in backends().items():
        options = ", ".join(spec.option_help()) or "no options"
        print(f"\n{name} ({'sparse' if spec.sparse else 'dense'}): {spec.summary}; options: {options}")
        for platform in sorted(PLATFORM_ORDER, key=lambda p: (p != here, p != "cpu")):
            line = describe(name, platform)
            if platform in (here, "cpu") and not line.startswith(("no:", "runs '")):
                try:
                    kernel_for(name, platform)
                except BackendUnavailableError as error:
                    line += f" -- cannot run here: {error.reason}"
            marker = "*" if platform == here else " "
            print(f" {marker} {platform:5s} {line}")
    print("\n* = this machine's platform")
    if here == "npu":
        print("sgl-kernel-npu ops found here: " + "; ".join(npu_kernel_ops_found()))
    return 0


def npu_kernel_ops_found() -> list[str]:
    """Per NPU kernel backend, the op it calls here and its package (``torch.ops.npu`` or, in older
    sgl-kernel-npu builds, ``torch.ops.attentions``), or why none."""
    from attnbridge.attention.backends.laser import LASER_OPS
    from attnbridge.attention.sparse.ascend import BLOCK_SPARSE_OPS, RAIN_FUSION_OPS
    from attnbridge.errors import BackendUnavailableError
    from attnbridge.platforms.npu import load_kernel_op

    found = []
    for backend, names in (
        ("laser", LASER_OPS),
        ("block_sparse", BLOCK_SPARSE_OPS),
        ("rain_fusion", RAIN_FUSION_OPS),
    ):
        try:
            op = load_kernel_op(backend, names)
            found.append(f"{backend} {op.qualified_name} (from {op.package})")
        except BackendUnavailableError as error:
            found.append(f"{backend} none ({error.reason})")
    return found


def generate_command(args: argparse.Namespace) -> int:
    from attnbridge.generation import run_generate

    given = {
        name: getattr(args, name)
        for name in ("model", "backend", "steps", "output", "prompt", "seed", "device")
    }
    run_generate(**given, config=dict(parse_option(o) for o in args.option))
    return 0


def parse_option(text: str) -> tuple[str, object]:
    """``key=value`` with the value read as int, float, true/false or a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--option expects key=value (e.g. sparsity=0.75), got {text!r}")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse's own errors as one ``error:`` line with exit 2, like every other error, not a usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="attnbridge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    backends_parser = sub.add_parser("backends", help="what this machine can run, and why not for the rest")
    backends_parser.set_defaults(func=backends_command)

    option_help = "; ".join(f"{k}: {v}" for k, v in OPTION_KEYS.items())
    gen = sub.add_parser(
        "generate",
        help="run a whole pipeline with a backend (tiny random model by default)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog=f"--option keys besides the backend's own (see `attnbridge backends`): {option_help}",
    )
    gen.add_argument("--model", default="wan-tiny", help="wan-tiny | qwen-image-tiny | qwen3-moe-tiny | PATH")
    gen.add_argument("--backend", default="sdpa", choices=list(backends()), help="attention backend")
    gen.add_argument("--steps", type=int, default=4, help="denoising steps; new tokens for text models")
    gen.add_argument("--prompt", default="a red fox running through snow", help="text prompt")
    gen.add_argument("--seed", type=int, default=0, help="seed of the random weights and noise")
    gen.add_argument(
        "--device", default=None, help="cpu, cuda, npu...; default: the accelerator found, else cpu"
    )
    gen.add_argument("--output", default="outputs", help="folder for the video/image/text and timings")
    gen.add_argument(
        "--option", action="append", default=[], help="key=value, repeatable (e.g. sparsity=0.75)"
    )
    gen.set_defaults(func=generate_command)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, ImportError) as error:  # BackendUnavailableError is an ImportError
        print(f"attnbridge {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
