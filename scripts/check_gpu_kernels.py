"""Correctness of every dense kernel on the GPU it runs on, against a float64 reference.

CI has no GPU, so this script is how the CUDA paths are checked: run it by hand on a CUDA machine
(it ran on an NVIDIA H200 with torch 2.11, docs/platforms.md). Exits non-zero if any case exceeds
its tolerance.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # runs from a bare checkout too
from attnbridge import attend  # noqa: E402

TOL = {torch.float32: 2e-3, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}  # tf32 may be on for fp32
SHAPES = [
    (1, 333, 333, 8, 8, 128),
    (2, 77, 301, 12, 4, 64),
    (1, 4096, 4096, 12, 12, 128),
    (2, 1, 513, 8, 2, 128),
]


def float64_reference(q, k, v, *, causal: bool):
    """Plain einsum + softmax in float64, sharing no code with the kernels it judges (``fa``'s own
    last resort is a float32 reference, so it cannot be the judge)."""
    groups = q.shape[2] // k.shape[2]
    q64 = q.double()
    k64 = k.double().repeat_interleave(groups, dim=2)
    v64 = v.double().repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q64, k64) / q.shape[-1] ** 0.5
    if causal:
        s_q, s_kv = q.shape[1], k.shape[1]
        rows = torch.arange(s_q, device=q.device)[:, None] + (s_kv - s_q)
        scores = scores.masked_fill(torch.arange(s_kv, device=q.device)[None, :] > rows, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(scores - lse[..., None]), v64)
    return out, lse


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run of this script only
    shapes = SHAPES if device == "cuda" else SHAPES[:2]
    failures = 0
    for shape in shapes:
        b, s_q, s_kv, h_q, h_kv, d = shape
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for causal in (False, True):
                q = torch.randn(b, s_q, h_q, d, device=device, dtype=dtype)
                k = torch.randn(b, s_kv, h_kv, d, device=device, dtype=dtype)
                v = torch.randn(b, s_kv, h_kv, d, device=device, dtype=dtype)
                ref, ref_lse = float64_reference(q, k, v, causal=causal)
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
