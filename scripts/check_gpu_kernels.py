"""Correctness of every dense kernel on the GPU it runs on, against the float32 reference.

CI has no GPU, so this script is how the CUDA paths are checked (run through the device tool).
Exits non-zero if any case exceeds its tolerance.
"""

from __future__ import annotations

import sys

import torch

from attnbridge import attend
from attnbridge.attention.backends.fa import reference_attention

TOL = {torch.float32: 2e-3, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}  # tf32 may be on for fp32
SHAPES = [
    (1, 333, 333, 8, 8, 128),
    (2, 77, 301, 12, 4, 64),
    (1, 4096, 4096, 12, 12, 128),
    (2, 1, 513, 8, 2, 128),
]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def main() -> int:
    failures = 0
    for shape in SHAPES:
        b, s_q, s_kv, h_q, h_kv, d = shape
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for causal in (False, True):
                q = torch.randn(b, s_q, h_q, d, device="cuda", dtype=dtype)
                k = torch.randn(b, s_kv, h_kv, d, device="cuda", dtype=dtype)
                v = torch.randn(b, s_kv, h_kv, d, device="cuda", dtype=dtype)
                ref, ref_lse = reference_attention(q, k, v, causal=causal, scale=d**-0.5, return_lse=True)
                for backend in ("sdpa", "fa", "sage"):
                    if backend == "sage" and dtype == torch.float32:
                        continue
                    out = attend(q, k, v, backend=backend, causal=causal)
                    err = rel(out, ref.float())
                    lse_err = None
                    if backend == "fa":
                        out2, lse = attend(q, k, v, backend="fa", causal=causal, return_lse=True)
                        err = max(err, rel(out2, ref.float()))
                        lse_err = float((lse - ref_lse).abs().max())
                    ok = err < TOL[dtype] and (lse_err is None or lse_err < 1e-2)
                    failures += not ok
                    print(
                        f"{'ok ' if ok else 'BAD'} {backend:5s} {str(dtype):15s} causal={causal!s:5s} {shape} "
                        f"rel_l2={err:.2e} lse_maxabs={lse_err}"
                    )
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
