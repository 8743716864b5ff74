"""CUDA-graph helpers for steps that serve adapters through a StaticAssignment
(mgr.static_assignment): capture a step, and keep transformers' StaticCache writing the same
position on every replay."""

from __future__ import annotations

from typing import Callable

import torch


def capture(step: Callable[[], object], warmups: int = 3, calls: int = 1) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `calls` back-to-back step() calls, warmed up `warmups` times on a side
    stream first (as capture requires: lazy allocations and handle creation stay out)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            step()
    return graph


def rewind_static_cache(cache, length: int) -> None:
    """transformers >= 5.2x's StaticCache layers count the tokens written so far in a device
    tensor (cumulative_length) and write there, whatever cache_position says: a replayed
    decode step must set it back (call this inside the captured step), or each replay writes
    one slot further, out of bounds after a few. A no-op for caches without the counter."""
    for layer in getattr(cache, "layers", ()):
        counter = getattr(layer, "cumulative_length", None)
        if isinstance(counter, torch.Tensor):
            counter.fill_(length)
