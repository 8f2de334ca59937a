"""Block selection replayed as a CUDA graph in eager mode: launched one by one, its ~30 small kernels
took the host longer than the GPU took to run the whole attention layer, so a model of many
sparse layers waited on the host.

A graph is captured per thread, per stream and per input signature (the shapes, strides, dtypes
and devices of the tensor arguments, the values of the others), into its own memory pool: two
threads or two streams never write one graph's inputs at once. Each call copies its tensors into
the graph's inputs, replays it and returns clones of its outputs, so nothing a call returns is
overwritten by a later one."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

import torch

#: Captured graphs kept per thread, least recently used dropped first (each holds a copy of its
#: tensor inputs and its intermediates on the GPU).
MAX_GRAPHS = 8

_local = threading.local()
#: One capture at a time: a device-wide sync in another thread would break a capture under way.
_capturing = threading.Lock()


def _signature(x):
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.stride(), x.dtype, x.device)
    return x


class _Captured:
    """``fn`` captured on copies of one call's arguments."""

    def __init__(self, fn: Callable, args: tuple) -> None:
        self.args = [x.clone() if isinstance(x, torch.Tensor) else x for x in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compiles and warms up outside the capture
            fn(*self.args)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.outputs = fn(*self.args)

    def __call__(self, args: tuple):
        for static, x in zip(self.args, args):
            if isinstance(x, torch.Tensor):
                static.copy_(x)
        self.graph.replay()
        return self.outputs


def replayed(fn: Callable) -> Callable:
    """``fn`` (tensor code on one CUDA device, no host sync) replayed from a graph captured on its first
    call with each signature; run as is while a CUDA graph is being captured around it."""

    def run(*args):
        if torch.cuda.is_current_stream_capturing():
            return fn(*args)
        graphs = getattr(_local, "graphs", None)
        if graphs is None:
            graphs = _local.graphs = collections.OrderedDict()
        device = next(x.device for x in args if isinstance(x, torch.Tensor))
        key = (fn, torch.cuda.current_stream(device).cuda_stream, *(_signature(x) for x in args))
        # The graph's inputs are written in place: they stay inference tensors, whatever the caller's mode.
        with torch.inference_mode(), torch.cuda.device(device):
            captured = graphs.get(key)
            if captured is None:
                with _capturing:
                    captured = graphs[key] = _Captured(fn, args)
                if len(graphs) > MAX_GRAPHS:
                    graphs.popitem(last=False)
            graphs.move_to_end(key)
            outputs = captured(args)
        return tuple(None if out is None else out.clone() for out in outputs)

    return run
