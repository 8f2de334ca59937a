"""How close does ``block_sparse``'s block selection come to ranking blocks by their exact mass? (CPU)

Two input generators over a (T, H, W) latent grid in raster token order:

* ``structured``: ``bench_sparse.py``'s :func:`structured_qkv`, a smooth random field shared by q
  and k (locality in space and time around each token);
* ``motion``: :func:`motion_qkv`, a textured background under a panning camera plus objects moving
  across the frames with their own velocities, no first-frame sink; each head's keys match its
  queries at a displaced position, so attention is local along the motion, not on the diagonal.

For each generator and sparsity, rel-L2 and cosine similarity against dense attention of:

* ``pooled top-k``: the simple baseline (mean-pooled ``q̄ · k̄`` per row; diagonal, first frame
  forced and paid from the budget; :func:`pooled_baseline.select_top_blocks`);
* ``block_sparse``: the backend's selection;
* ``row oracle``: the same number of blocks per head, each row keeping its blocks of highest *exact*
  attention mass (no forced blocks), the reference the selector is measured against;
* ``row oracle, forced priors``: the row oracle with the baseline's forced blocks (what
  ``oracle_block_selection.py`` reports);

and, for ``mass`` thresholds, the achieved mean sparsity and the error beside the fixed-budget
selection at that same sparsity. ``--sharpness`` multiplies q (so every logit): the generators'
attention at 1, more concentrated above. Everything is float32; the exact references are computed block
row by block row, so the full Wan grid with a few heads fits in memory.

    python scripts/selection_quality.py --grid 21 30 52 --heads 2 --out selection_quality.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import print_table, write_json  # noqa: E402
from bench_sparse import structured_qkv  # noqa: E402
from oracle_block_selection import block_mass  # noqa: E402
from pooled_baseline import dense_blocks, dense_rows, select_top_blocks  # noqa: E402

from attnbridge.attention.backends.block_sparse import BlockSparseOptions, select_block_sparse  # noqa: E402
from attnbridge.attention.contract import AttentionContext  # noqa: E402
from attnbridge.attention.options import kept_count  # noqa: E402
from attnbridge.attention.sparse.layout import resolve_layout  # noqa: E402
from attnbridge.attention.sparse.selection import (  # noqa: E402
    MASS_ESTIMATE,
    RANK_ESTIMATE,
    estimated_block_mass,
    indices_to_mask,
    mass_counts,
    pooled_scores,
    select_by_mass,
)

BLOCK = 128


# ----------------------------------------------------------------------------------------------
# The motion generator


def _fourier_field(coords, scales, features, dim, gen, rank=384):
    """A smooth Gaussian random field, ``dim`` channels at float ``coords`` ``[S, 3]`` (t, y, x):
    random Fourier features of a squared-exponential kernel with per-axis length ``scales``.
    ``features`` (the frequencies, phases and mixing) come from ``gen``, so two fields drawn with
    the same ``features`` are the same function (a texture moved with its object)."""
    if features is None:
        freq = torch.randn(3, rank, generator=gen) / torch.tensor(scales)[:, None]
        phase = torch.rand(rank, generator=gen) * 2 * math.pi
        mix = torch.randn(rank, dim, generator=gen) * math.sqrt(2.0 / rank)
        features = (freq, phase, mix)
    freq, phase, mix = features
    return torch.cos(coords @ freq + phase) @ mix, features


def motion_qkv(
    grid,
    heads,
    dim,
    *,
    device="cpu",
    dtype=torch.float32,
    noise=0.5,
    seed=0,
    pan=(0.4, 1.5),
    num_objects=4,
    scales=(2.0, 3.0, 5.0),
):
    """q, k, v ``[1, T*H*W, heads, dim]`` of a video with a panning camera and moving objects.

    Every token shows a point of the scene: the background, a texture on a canvas that the camera
    pans over at ``pan`` (rows, columns) per frame, or one of ``num_objects`` discs (radius 4-8
    tokens) that cross the frame with their own velocity (up to 2.5 tokens per frame) and carry
    their own texture. q and v are smooth random fields of that scene point (length ``scales`` in
    frames, rows, columns: the texture also changes slowly over time); each head reads its keys at
    a displaced point of the same field (head ``h``: (0, 0), (2, -6), (-3, 4), (1, 9) tokens, then
    again), so a query matches the keys along the motion, in nearby frames, displaced. No frame is
    special (no first-frame sink). Channels have unit variance, then independent noise of std
    ``noise``. Deterministic in ``seed``.
    """
    frames, height, width = grid
    gen = torch.Generator(device="cpu").manual_seed(seed)
    t, y, x = (c.flatten().float() for c in torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij"))
    centers = torch.rand(num_objects, 2, generator=gen) * torch.tensor([height, width], dtype=torch.float32)
    velocity = (torch.rand(num_objects, 2, generator=gen) * 2 - 1) * 2.5
    radius = 4 + 4 * torch.rand(num_objects, generator=gen)
    offsets = [(0.0, 0.0), (2.0, -6.0), (-3.0, 4.0), (1.0, 9.0)]

    def scene(dy, dx):
        """(background coords, per-object coords, per-object weights) of the point (t, y+dy, x+dx)."""
        yy, xx = y + dy, x + dx
        background = torch.stack([t, yy + pan[0] * t, xx + pan[1] * t], -1)
        objects, weights = [], []
        for o in range(num_objects):
            oy, ox = yy - centers[o, 0] - velocity[o, 0] * t, xx - centers[o, 1] - velocity[o, 1] * t
            objects.append(torch.stack([t, oy, ox], -1))
            weights.append(torch.sigmoid(radius[o] - torch.sqrt(oy**2 + ox**2)))
        return background, objects, weights

    def render(points, textures):
        background, objects, weights = points
        out = _fourier_field(background, scales, textures[0], dim, gen)[0]
        for coords, weight, texture in zip(objects, weights, textures[1:]):  # later objects in front
            out = torch.lerp(out, _fourier_field(coords, scales, texture, dim, gen)[0], weight[:, None])
        return out

    def textures():
        return [_fourier_field(torch.zeros(1, 3), scales, None, dim, gen)[1] for _ in range(num_objects + 1)]

    q_heads, k_heads, v_heads = [], [], []
    for head in range(heads):
        qk_texture, v_texture = textures(), textures()
        here = scene(0.0, 0.0)
        q_heads.append(render(here, qk_texture))
        k_heads.append(render(scene(*offsets[head % len(offsets)]), qk_texture))
        v_heads.append(render(here, v_texture))

    def finish(per_head):
        x = torch.stack(per_head, 1)  # [S, heads, dim]
        x = (x - x.mean(0)) / x.std(0)
        x = x + noise * torch.randn(x.shape, generator=gen)
        return x.to(device=device, dtype=dtype).contiguous()[None]

    return finish(q_heads), finish(k_heads), finish(v_heads)


GENERATORS = {"structured": structured_qkv, "motion": motion_qkv}


# ----------------------------------------------------------------------------------------------
# Exact references, one block row at a time


def _block_row_scores(q, k, scale, row):
    """Exact logits of query block ``row`` ``[H, <=128, nb*128]`` (pad keys -inf); q, k ``[H, S, D]``."""
    seq = k.shape[1]
    nb = math.ceil(seq / BLOCK)
    scores = q[:, row * BLOCK : (row + 1) * BLOCK] @ k.transpose(1, 2) * scale
    return torch.nn.functional.pad(scores, (0, nb * BLOCK - seq), value=float("-inf"))


def evaluate_masks(q, k, v, masks, scale):
    """{name: (rel-L2, cosine similarity)} against dense attention of attention restricted to each
    kept-block mask ``[H, nb, nb]``; one pass of exact per-block partial results serves every mask."""
    heads, seq, dim = q.shape
    nb = math.ceil(seq / BLOCK)
    v_blocks = torch.nn.functional.pad(v, (0, 0, 0, nb * BLOCK - seq)).view(heads, nb, BLOCK, dim)
    sums = {name: [0.0, 0.0, 0.0] for name in masks}  # |err|^2, <out, ref>, |out|^2
    ref_sq = 0.0
    for row in range(nb):
        scores = _block_row_scores(q, k, scale, row).unflatten(-1, (nb, BLOCK))  # [H, r, nb, 128]
        peak = scores.amax(-1)  # [H, r, nb]
        probs = torch.exp(scores - peak[..., None])
        partial_sum = probs.sum(-1)  # [H, r, nb]
        partial_out = torch.einsum("hqjk,hjkd->hqjd", probs, v_blocks)  # [H, r, nb, D]
        top = peak.amax(-1, keepdim=True)
        weight = torch.exp(peak - top)
        dense = torch.einsum("hqj,hqjd->hqd", weight, partial_out) / (weight * partial_sum).sum(-1)[..., None]
        ref_sq += float(dense.double().pow(2).sum())
        for name, mask in masks.items():
            kept = mask[:, row, None, :].expand_as(peak)
            kept_top = peak.masked_fill(~kept, float("-inf")).amax(-1, keepdim=True)
            w = torch.exp(peak - kept_top).masked_fill(~kept, 0.0)
            out = torch.einsum("hqj,hqjd->hqd", w, partial_out) / (w * partial_sum).sum(-1)[..., None]
            out = torch.nan_to_num(out)  # a row that keeps nothing gives 0
            acc = sums[name]
            acc[0] += float((out - dense).double().pow(2).sum())
            acc[1] += float((out.double() * dense.double()).sum())
            acc[2] += float(out.double().pow(2).sum())
    return {
        name: (math.sqrt(err / ref_sq), dot / math.sqrt(max(out_sq, 1e-300) * ref_sq))
        for name, (err, dot, out_sq) in sums.items()
    }


# ----------------------------------------------------------------------------------------------
# Selections to compare, all as kept-block masks [H, nb, nb] of one sample


def pooled_top_k(q, k, scale, sparsity, layout):
    """The previous rule: pooled scores, diagonal and first frame forced and paid from the budget."""
    scores = pooled_scores(q, k, layout.block_size, scale)
    selection = select_top_blocks(scores, sparsity, dense_blocks(layout, q.device), len(dense_rows(layout)))
    return selection.mask()[0]


def row_oracle(mass, total):
    """Each row keeps its ``total // nq`` blocks of highest exact mass (plus one more on the
    ``total % nq`` rows whose next block holds the most), ``total`` pairs per head."""
    heads, nq, nk = mass.shape
    keep = total // nq
    order = mass.argsort(-1, descending=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(nk).expand_as(order))
    mask = rank < keep
    extra = total - keep * nq
    if extra and keep < nk:
        next_mass = mass.gather(-1, order[..., keep : keep + 1])[..., 0]  # [H, nq]
        rows = next_mass.topk(extra, -1).indices
        bonus = torch.zeros(heads, nq, dtype=torch.bool).scatter_(-1, rows, True)
        mask |= bonus[..., None] & (rank == keep)
    return mask


def exact_placement(mass, total):
    """``block_sparse``'s placement fed the exact mass instead of its estimate."""
    log_mass = (mass / mass.sum(-1, keepdim=True)).log()[None]
    no_forced = torch.zeros(mass.shape[-1], mass.shape[-1], dtype=torch.bool)
    budget = torch.full((1, mass.shape[0]), total)
    return select_by_mass(log_mass, budget, no_forced).mask()[0]


def per_row_threshold(q, k, scale, layout, threshold):
    """Each row its own fewest blocks reaching ``threshold`` of estimated mass (no placement)."""
    (ranking, counting), _ = estimated_block_mass(
        q, k, layout.block_size, scale, estimates=(RANK_ESTIMATE, MASS_ESTIMATE)
    )
    no_forced = torch.zeros(layout.num_blocks, layout.num_blocks, dtype=torch.bool)
    counts = mass_counts(counting, threshold, no_forced)[0]  # [H, nq]
    order = ranking[0].argsort(-1, descending=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order))
    return rank < counts[..., None]


def selector_mask(q, k, scale, layout, **options):
    selection = select_block_sparse(q, k, scale, BlockSparseOptions(**options), layout)
    return indices_to_mask(selection.indices, selection.counts, selection.num_kv_blocks)[0]


def measure(generator, grid, heads, dim, sparsities, thresholds, sharpness=1.0):
    """(fixed-budget rows, mass rows) of one generator, its queries multiplied by ``sharpness``."""
    scale = dim**-0.5
    q, k, v = GENERATORS[generator](grid, heads, dim, device="cpu", dtype=torch.float32)
    q = q * sharpness
    layout = resolve_layout("block_sparse", q, AttentionContext(kind="self", grid=grid, step=10))
    nb = layout.num_blocks
    qh, kh, vh = (x[0].transpose(0, 1).contiguous() for x in (q, k, v))  # [H, S, D]
    mass = block_mass(qh, kh, scale)
    dense = dense_blocks(layout, "cpu")
    masks = {}
    for sparsity in sparsities:
        total = kept_count(sparsity, nb * nb)
        masks[sparsity] = {
            "pooled top-k": pooled_top_k(q, k, scale, sparsity, layout),
            "block_sparse": selector_mask(q, k, scale, layout, sparsity=sparsity),
            "row oracle": row_oracle(mass, total),
            "row oracle, forced priors": select_top_blocks(
                mass[None], sparsity, dense, len(dense_rows(layout))
            ).mask()[0],
            "exact-mass placement": exact_placement(mass, total),
        }
    reached = {}
    for threshold in thresholds:
        chosen = selector_mask(q, k, scale, layout, mass=threshold)
        same = round(1.0 - float(chosen.float().mean()), 4)
        reached[threshold] = (same, chosen.flatten(1).float().mean(-1))
        masks[("mass", threshold)] = {
            "mass": chosen,
            "fixed budget": selector_mask(q, k, scale, layout, sparsity=same),
            "per-row threshold": per_row_threshold(q, k, scale, layout, threshold),
            "pooled top-k": pooled_top_k(q, k, scale, same, layout),
            "row oracle": row_oracle(mass, kept_count(same, nb * nb)),
        }
    flat = {(key, name): mask for key, group in masks.items() for name, mask in group.items()}
    errors = evaluate_masks(qh, kh, vh, flat, scale)

    def mass_kept(mask):
        return round(float((mass * mask).sum() / mass.sum()), 4)

    rows = []
    for sparsity in sparsities:
        oracle = errors[(sparsity, "row oracle")][0]
        for name, mask in masks[sparsity].items():
            rel, cos = errors[(sparsity, name)]
            rows.append(
                {
                    "generator": generator,
                    "sharpness": sharpness,
                    "sparsity": sparsity,
                    "selection": name,
                    "kept": round(float(mask.float().mean()), 4),
                    "mass kept": mass_kept(mask),
                    "rel_l2": round(rel, 4),
                    "cos": round(cos, 5),
                    "vs row oracle": round(rel / oracle, 2) if oracle else None,  # None: oracle exact
                }
            )
    mass_rows = []
    for threshold in thresholds:
        group = masks[("mass", threshold)]
        same, per_head = reached[threshold]
        row = {
            "generator": generator,
            "sharpness": sharpness,
            "mass": threshold,
            "sparsity reached": same,
            "head kept min": round(float(per_head.min()), 3),
            "head kept max": round(float(per_head.max()), 3),
            "mass kept": mass_kept(group["mass"]),
        }
        for name, key in (
            ("mass", ""),
            ("fixed budget", "fixed budget "),
            ("per-row threshold", "per-row threshold "),
            ("pooled top-k", "pooled top-k "),
            ("row oracle", "row oracle "),
        ):
            rel, cos = errors[(("mass", threshold), name)]
            row[f"{key}rel_l2"] = round(rel, 4)
            row[f"{key}cos"] = round(cos, 5)
        mass_rows.append(row)
    return rows, mass_rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grid", type=int, nargs=3, default=[21, 30, 52])
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--generators", nargs="+", default=list(GENERATORS), choices=list(GENERATORS))
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    parser.add_argument("--mass", type=float, nargs="*", default=[0.8, 0.9, 0.95])
    parser.add_argument(
        "--sharpness",
        type=float,
        nargs="+",
        default=[1.0],
        help="factors on q (so on every logit): above 1, attention concentrates on fewer keys",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)  # exp() of far-off logits: denormals make the CPU crawl
    grid = tuple(args.grid)
    rows, mass_rows = [], []
    for sharpness in args.sharpness:
        for generator in args.generators:
            start = time.perf_counter()
            more, more_mass = measure(
                generator, grid, args.heads, args.dim, args.sparsity, args.mass, sharpness
            )
            for row in more + more_mass:
                print(row, flush=True)
            rows += more
            mass_rows += more_mass
            print(f"{generator} x{sharpness}: {time.perf_counter() - start:.0f} s", flush=True)
    print(f"grid {grid}, {args.heads} heads of {args.dim}, float32, raster order")
    print_table(rows, list(rows[0]))
    if mass_rows:
        print_table(mass_rows, list(mass_rows[0]))
    write_json(
        args.out,
        {"grid": list(grid), "heads": args.heads, "head_dim": args.dim, "rows": rows, "mass_rows": mass_rows},
        kind="selection_quality",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
