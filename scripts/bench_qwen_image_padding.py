"""Qwen-Image transformer calls with and without a padded text mask: what key padding costs.

Builds the real ``QwenImageTransformer2DModel`` at its full width (24 heads of 128, joint dim 3584)
with fewer layers (``--layers``, 20 of its 60 by default), random weights, bf16, one 1024x1024 image
(4,096 packed image tokens) and 256 text tokens. Each row is one backend (the unpatched model,
then each ``--backends`` entry) timed on the same input: text unpadded, and with the last
``--pad`` text tokens marked as padding in ``encoder_hidden_states_mask`` (a batch of prompts of
different lengths), the cases called in turn so that they share the device's drift. Outputs are
checked against the unpatched model on the same input, padded and unpadded. ``padded / unpadded`` is the cost of the mask (1.0: none). With one prompt its padding
is padding in every sample, which attention leaves out; ``--pairs`` adds a batch of two prompts, the
second padded (``mixed``), against the same two unpadded: there the mask itself is served.

    python scripts/bench_qwen_image_padding.py --backends fa block_sparse:0.75 --out out.json
    python scripts/bench_qwen_image_padding.py --small    # CPU smoke run on a tiny config
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    DEFAULT,
    QWEN_IMAGE,
    add_timing_arguments,
    device_name,
    interleaved_wall_ms,
    model_device,
    parse_backend,
    print_table,
    rel_l2,
    write_json,
)

from attnbridge import disable_npu_attention, enable_npu_attention  # noqa: E402

SMALL = dict(
    QWEN_IMAGE,
    attention_head_dim=64,
    num_attention_heads=2,
    joint_attention_dim=64,
    axes_dims_rope=(16, 24, 24),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", nargs="+", default=["fa", "block_sparse:0.75"])
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--side", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--text", type=int, default=256, help="text tokens")
    parser.add_argument("--pad", type=int, default=64, help="padded text tokens (at the end)")
    parser.add_argument("--pairs", action="store_true", help="also time batches of two prompts")
    add_timing_arguments(parser)
    args = parser.parse_args(argv)

    import diffusers
    from diffusers import QwenImageTransformer2DModel

    device, dtype = model_device(args.small)
    config = SMALL if args.small else QWEN_IMAGE
    layers, side, text = (2, 256, 32) if args.small else (args.layers, args.side, args.text)
    pad = min(args.pad, text - 1)
    grid = side // 16  # 8x VAE, then 2x2 patches
    torch.manual_seed(0)
    with torch.device(device):
        model = QwenImageTransformer2DModel(**{**config, "num_layers": layers}).to(dtype=dtype).eval()
    image = torch.randn(2, grid * grid, config["in_channels"], device=device, dtype=dtype)
    prompt = torch.randn(2, text, config["joint_attention_dim"], device=device, dtype=dtype)
    full = torch.ones(text, dtype=torch.long, device=device)
    short = (torch.arange(text, device=device) < text - pad).long()
    masks = {"unpadded": full[None], "padded": short[None]}
    if args.pairs:
        masks.update({"two": torch.stack([full, full]), "mixed": torch.stack([full, short])})

    def step(mask):
        batch = mask.shape[0]

        @torch.inference_mode()
        def run():
            return model(
                hidden_states=image[:batch],
                encoder_hidden_states=prompt[:batch],
                encoder_hidden_states_mask=mask,
                timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
                img_shapes=[[(1, grid, grid)]] * batch,
                return_dict=False,
            )[0]

        return run

    references = {name: step(mask)().float() for name, mask in masks.items()}
    rows = []
    for backend in [DEFAULT, *args.backends]:
        row = {"backend": backend}
        if backend != DEFAULT:
            name, options = parse_backend(backend)
            enable_npu_attention(model, backend=name, **options)
        try:
            runs = {case: step(mask) for case, mask in masks.items()}
            errors = {case: rel_l2(run().float(), references[case]) for case, run in runs.items()}
            times = interleaved_wall_ms(runs, warmup=args.warmup, repeat=args.repeat)
            for case in runs:
                row[f"{case} rel_l2"] = f"{errors[case]:.2e}"
                row[f"{case} ms"] = round(times[case], 2)
        finally:
            if backend != DEFAULT:
                disable_npu_attention(model)
        row["padded / unpadded"] = f"{row['padded ms'] / row['unpadded ms']:.3f}"
        if args.pairs:
            row["mixed / two"] = f"{row['mixed ms'] / row['two ms']:.3f}"
        print(row, flush=True)
        rows.append(row)

    print(f"device: {device_name(device)}  image tokens {grid * grid}  text {text} ({pad} padded)")
    print_table(rows, list(rows[0]))
    write_json(
        args.out,
        {
            "device": device_name(device),
            "diffusers": diffusers.__version__,
            "layers": layers,
            "image_tokens": grid * grid,
            "text_tokens": text,
            "padded_text_tokens": pad,
            "pairs": args.pairs,
            "dtype": str(dtype),
            "rows": rows,
        },
        kind="qwen_image_padding",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
