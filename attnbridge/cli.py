"""The ``attnbridge`` command: ``backends`` (what runs here), ``generate`` (a whole pipeline), ``matrix``,
``docs``."""

from __future__ import annotations

import argparse
import sys

from attnbridge.attention.registry import BACKENDS


def backends_command(args: argparse.Namespace) -> int:
    """Print, for every backend, what each platform would run, marking the platform found here."""
    from attnbridge.platforms import PLATFORMS, detect_platform

    here = detect_platform().name
    print(f"platform detected: {here}")
    for name, spec in BACKENDS.items():
        print(f"\n{name} ({'sparse' if spec.sparse else 'dense'}): {spec.summary}")
        for platform in PLATFORMS.values():
            if platform.name == here or platform.name == "cpu":
                marker = "*" if platform.name == here else "+"
                print(f" {marker} {platform.name:5s} {platform.describe(name)}")
            else:
                print(f"   {platform.name:5s} not this machine; table: {_table_entry(platform, name)}")
    print("\n* = the accelerator found here, + = also usable here (CPU tensors)")
    return 0


def _table_entry(platform, backend: str) -> str:
    kernel = platform.kernels.get(backend)
    if kernel is None or kernel.path is None:
        return f"no: {kernel.unavailable if kernel else 'no kernel'}"
    return kernel.path.rpartition(".")[2] + (
        f" (falls back to {kernel.fallback!r})" if kernel.fallback else ""
    )


def generate_command(args: argparse.Namespace) -> int:
    from attnbridge.generate import run_generate

    run_generate(
        model=args.model,
        backend=args.backend,
        steps=args.steps,
        output=args.output,
        prompt=args.prompt,
        seed=args.seed,
        device=args.device,
        config=dict(_parse_option(o) for o in args.option),
    )
    return 0


def matrix_command(args: argparse.Namespace) -> int:
    from attnbridge.matrix import run_matrix

    return run_matrix(verbose=args.verbose)


def docs_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from attnbridge.docs_gen import docs_main

    root = Path(args.root) if args.root else Path(__file__).resolve().parent.parent
    return docs_main(root, check=args.check)


def _parse_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--option expects key=value, got {text!r}")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnbridge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("backends", help="what this machine can run, and why not for the rest").set_defaults(
        func=backends_command
    )

    gen = sub.add_parser(
        "generate", help="run a whole pipeline with a backend (tiny random model by default)"
    )
    gen.add_argument("--model", default="wan-tiny", help="wan-tiny | qwen-image-tiny | qwen3-moe-tiny | PATH")
    gen.add_argument("--backend", default="sdpa", choices=list(BACKENDS))
    gen.add_argument("--steps", type=int, default=4, help="denoising steps; new tokens for text models")
    gen.add_argument("--prompt", default="a red fox running through snow")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default=None, help="default: the accelerator found, else cpu")
    gen.add_argument("--output", default="outputs", help="folder for the video/image/text and timings")
    gen.add_argument(
        "--option", action="append", default=[], help="backend option key=value (e.g. sparsity=0.75)"
    )
    gen.set_defaults(func=generate_command)

    mat = sub.add_parser("matrix", help="run the backend x model x platform matrix and print it")
    mat.add_argument("--verbose", action="store_true")
    mat.set_defaults(func=matrix_command)

    docs = sub.add_parser("docs", help="regenerate docs/ (compatibility matrix, backends, bench results)")
    docs.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    docs.add_argument("--root", default=None, help="repository root (default: the one attnbridge is in)")
    docs.set_defaults(func=docs_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; a bad model, backend or option is one ``error:`` line and exit status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, ImportError) as error:  # BackendUnavailableError is an ImportError
        print(f"attnbridge {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
