"""One Wan2.1-1.3B-size transformer step at 480p (random weights): unpatched diffusers vs attnbridge backends.

Builds the real ``WanTransformer3DModel`` with the 1.3B architecture (30 layers, 12 heads of 128,
ffn 8960) and a 480p latent (16 x 21 x 60 x 104 -> 32,760 tokens). For each backend it checks the
patched output against the unpatched one on the same random input, then times the step (median).

    python scripts/bench_wan_step.py --backends sdpa fa block_sparse:0.85 --out step.json
    python scripts/bench_wan_step.py --small          # CPU smoke run on a tiny config
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import WAN_1_3B, device_name, print_table, rel_l2, wall_ms, write_json  # noqa: E402

from attnbridge import disable_npu_attention, enable_npu_attention  # noqa: E402

WAN_SMALL = {
    **WAN_1_3B,
    "num_attention_heads": 2,
    "attention_head_dim": 64,
    "ffn_dim": 256,
    "num_layers": 2,
    "text_dim": 64,
}


def parse_backend(text: str) -> tuple[str, dict]:
    """``name`` or ``name:sparsity``."""
    name, _, sparsity = text.partition(":")
    if not sparsity:
        return name, {}
    options = {"sparsity": float(sparsity)}
    if name in ("block_sparse", "rain_fusion"):
        options["skip_first_steps"] = 0  # a bare transformer call has no step count: sparse from the start
    return name, options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backends", nargs="+", default=["sdpa", "fa"])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--frames", type=int, default=21, help="latent frames (81 video frames -> 21)")
    parser.add_argument("--height", type=int, default=60, help="latent height (480 / 8)")
    parser.add_argument("--width", type=int, default=104, help="latent width (832 / 8)")
    parser.add_argument("--compile", action="store_true", help="also time with compile_repeated_blocks")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from diffusers import WanTransformer3DModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = WAN_SMALL if args.small else WAN_1_3B
    frames, height, width = (3, 8, 8) if args.small else (args.frames, args.height, args.width)
    torch.manual_seed(0)
    model = WanTransformer3DModel(**config).to(device=device, dtype=dtype).eval()
    latent = torch.randn(1, 16, frames, height, width, device=device, dtype=dtype)
    text = torch.randn(1, 512, config["text_dim"], device=device, dtype=dtype)
    timestep = torch.tensor([500], device=device)
    tokens = frames * (height // 2) * (width // 2)

    @torch.inference_mode()
    def step():
        return model(hidden_states=latent, timestep=timestep, encoder_hidden_states=text, return_dict=False)[
            0
        ]

    reference = step().float()
    rows = [
        {
            "backend": "diffusers default (unpatched)",
            "ms": round(wall_ms(step, warmup=2, repeat=5), 2),
            "rel_l2": "-",
        }
    ]
    baseline = rows[0]["ms"]
    for text_backend in args.backends:
        name, options = parse_backend(text_backend)
        enable_npu_attention(model, backend=name, **options)
        try:
            error = rel_l2(step().float(), reference)
            ms = wall_ms(step, warmup=2, repeat=5)
        finally:
            disable_npu_attention(model)
        rows.append({"backend": text_backend, "ms": round(ms, 2), "rel_l2": f"{error:.2e}"})
    for row in rows:
        row["speedup vs default"] = f"{baseline / row['ms']:.3f}x"
    print(f"device: {device_name()}  tokens {tokens}  dtype {dtype}  layers {config['num_layers']}")
    print_table(rows, ["backend", "ms", "speedup vs default", "rel_l2"])
    write_json(args.out, {"tokens": tokens, "config": {k: str(v) for k, v in config.items()}, "rows": rows})


if __name__ == "__main__":
    main()
