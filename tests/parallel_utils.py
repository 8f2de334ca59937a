"""Running test cases on several gloo processes spawned by the test itself.

Spawning costs seconds (each process imports torch), so one spawn runs a whole list of cases and
returns every rank's result per case; tests then assert on those results one by one. A case is a
picklable callable (module-level function or ``functools.partial`` of one) taking the rank's
:class:`attnbridge.attention.parallel.DistributedInfo` and returning a JSON-serialisable value.
Exceptions are caught per case and come back as tracebacks, so one broken case does not hide the
others; a hang is cut by the gloo timeout and by the overall deadline.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp

#: Seconds a collective may wait for a peer before gloo gives up (a failed case on one rank).
COLLECTIVE_TIMEOUT_S = 60
CASE_SEED = 20240611

Case = tuple[str, Callable]


def _worker(rank: int, world_size: int, init_file: str, out_dir: str, cases: Sequence[Case]) -> None:
    import torch.distributed as dist

    from attnbridge.attention.parallel import init_distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    os.environ.pop("ATTNBRIDGE_PLATFORM", None)
    if Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # never depend on the host name resolving
    torch.set_num_threads(1)  # N processes on 2 cores: no oversubscription
    info = init_distributed(
        platform="cpu", init_method=f"file://{init_file}", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    )
    results = {}
    healthy = True
    for name, case in cases:
        if not healthy:
            results[name] = {"error": "not run: an earlier case left the process group out of step"}
            continue
        torch.manual_seed(CASE_SEED)  # every rank draws the same full inputs
        try:
            results[name] = {"value": case(info)}
        except Exception:  # reported to the parent test, which fails with this traceback
            results[name] = {"error": traceback.format_exc()}
        try:
            dist.barrier()
        except RuntimeError:  # a case failed on one rank only, mid-collective
            healthy = False
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    if healthy:
        dist.destroy_process_group()
    # The results are on disk. Skip interpreter finalisation: gloo subgroups that live on past
    # destroy_process_group (the parallel-groups cache) sometimes abort the process there ("terminate
    # called without an active exception", no Python frame), failing a test whose cases all passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_cases(world_size: int, cases: Sequence[Case], *, deadline_s: float = 300) -> dict[str, list[dict]]:
    """Run ``cases`` on ``world_size`` spawned gloo ranks; ``{name: [rank0 result, rank1 ...]}``
    where a result is ``{"value": ...}`` or ``{"error": traceback}``."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        context = mp.start_processes(
            _worker,
            args=(world_size, init_file, tmp, list(cases)),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        stop_at = time.monotonic() + deadline_s
        while not context.join(timeout=1):
            if time.monotonic() > stop_at:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise TimeoutError(f"{world_size} spawned ranks did not finish within {deadline_s} s")
        per_rank = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world_size)]
    return {name: [results[name] for results in per_rank] for name, _ in cases}


def values(results: dict[str, list[dict]], name: str) -> list:
    """Every rank's value for case ``name``; fails the test with the rank's traceback if it raised."""
    import pytest

    errors = [f"rank {rank}:\n{r['error']}" for rank, r in enumerate(results[name]) if "error" in r]
    if errors:
        pytest.fail(f"case {name!r} raised\n" + "\n".join(errors), pytrace=False)
    return [result["value"] for result in results[name]]
