"""Dense attention at the Wan2.1-1.3B 480p self-attention shape: attnbridge ``fa`` vs torch SDPA kernels.

Each kernel is first checked against a float32 reference on a slice of query rows (fresh random
inputs), then timed (median). Usage: ``python scripts/bench_dense.py --out results.json`` on a GPU,
``--small`` for a CPU smoke run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import device_name, median_ms, print_table, rel_l2, write_json  # noqa: E402

from attnbridge import AttentionLayer  # noqa: E402
from attnbridge.attention.backends.fa import reference_attention  # noqa: E402


def sdpa_with(backend: SDPBackend):
    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            ).transpose(1, 2)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq", type=int, default=32760)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--small", action="store_true", help="CPU smoke run at a tiny shape")
    parser.add_argument("--check-rows", type=int, default=1024)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    seq = 512 if args.small else args.seq
    shape = (1, seq, args.heads, args.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))

    fa_layer = AttentionLayer("fa")
    candidates = {"attnbridge fa": lambda q, k, v: fa_layer(q, k, v)}
    candidates["attnbridge fa (+LSE)"] = lambda q, k, v: fa_layer(q, k, v, return_lse=True)[0]
    sdpa_layer = AttentionLayer("sdpa")
    candidates["attnbridge sdpa"] = lambda q, k, v: sdpa_layer(q, k, v)
    if device == "cuda":
        candidates["SDPA cuDNN"] = sdpa_with(SDPBackend.CUDNN_ATTENTION)
        candidates["SDPA flash"] = sdpa_with(SDPBackend.FLASH_ATTENTION)
        candidates["SDPA mem-efficient"] = sdpa_with(SDPBackend.EFFICIENT_ATTENTION)

    rows_checked = min(args.check_rows, seq)
    reference = reference_attention(
        q[:, :rows_checked], k, v, causal=False, scale=args.head_dim**-0.5, return_lse=False
    ).float()
    flops = 4 * seq * seq * args.heads * args.head_dim
    rows = []
    for name, fn in candidates.items():
        try:
            error = rel_l2(fn(q, k, v)[:, :rows_checked].float(), reference)
            ms = median_ms(lambda fn=fn: fn(q, k, v))
        except RuntimeError as exc:  # a kernel this GPU/torch build lacks
            rows.append({"kernel": name, "ms": "n/a", "note": str(exc).splitlines()[0][:60]})
            continue
        rows.append(
            {
                "kernel": name,
                "ms": round(ms, 3),
                "TFLOP/s": round(flops / ms / 1e9, 1),
                "rel_l2": f"{error:.2e}",
            }
        )
    timed = [r for r in rows if isinstance(r["ms"], float)]
    fastest_sdpa = min((r["ms"] for r in timed if r["kernel"].startswith("SDPA")), default=None)
    for r in timed:
        if fastest_sdpa:
            r["vs fastest SDPA"] = f"{r['ms'] / fastest_sdpa:.3f}x"
    print(f"device: {device_name()}  shape B,S,H,D = {shape}  dtype {dtype}")
    print_table(rows, ["kernel", "ms", "TFLOP/s", "rel_l2", "vs fastest SDPA", "note"])
    write_json(args.out, {"shape": list(shape), "dtype": str(dtype), "rows": rows}, kind="dense")


if __name__ == "__main__":
    main()
