"""CUDA-graph conditional nodes for the decode step (no vLLM import).

A decode step is replayed from a CUDA graph captured once per batch size, so which rows are dense cannot change
what the graph launches: vLLM's FlashAttention runs in every layer even when every row is CAB's (at 128k on the
H200: 8 us per layer for a kernel and its split combine with nothing to do), and CAB's decode launch runs even
when every row is FlashAttention's (2 us per layer). With ``graph_branch`` each of the two is captured inside an
IF node that the replay takes only when the step has rows for it (a flag the metadata builder copies to the
device with the step's routes). PyTorch exposes the nodes (CUDA 12.4+) as
``torch.cuda.CUDAGraph.begin_capture_to_if_node`` (PyTorch 2.13; not 2.11, the torch of vLLM 0.26); each node
adds a one-thread kernel that reads its flag.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def conditional_nodes_supported() -> bool:
    """Whether this PyTorch can capture IF nodes into a CUDA graph: the node methods and the lookup of the graph
    being captured (PyTorch 2.13 has them; 2.11, which vLLM 0.26 pins, has none), built with CUDA 12.4 or newer."""
    g = getattr(torch.cuda, "CUDAGraph", None)
    cuda = tuple(int(x) for x in (torch.version.cuda or "0.0").split(".")[:2])
    return g is not None and cuda >= (12, 4) and all(hasattr(g, n) for n in (
        "get_currently_capturing_graph", "begin_capture_to_if_node", "end_capture_to_conditional_node"))


def check_supported() -> None:
    """ValueError naming what is missing when graph branches were asked for and cannot be captured here."""
    if not conditional_nodes_supported():
        raise ValueError(f"CAB_GRAPH_BRANCHES=1 needs CUDA-graph conditional nodes (PyTorch's "
                         f"CUDAGraph.begin_capture_to_if_node and get_currently_capturing_graph, CUDA 12.4+); "
                         f"torch {torch.__version__} (CUDA {torch.version.cuda}) does not have them")


@contextlib.contextmanager
def graph_branch(pred: torch.Tensor) -> Iterator[None]:
    """Capture the body into an IF node of the CUDA graph being captured: at each replay its kernels run only when
    ``pred`` (a one-element bool CUDA tensor, read at replay time) is true. Outside a capture the body just runs."""
    if not (pred.is_cuda and torch.cuda.is_current_stream_capturing()):
        yield
        return
    if pred.dtype != torch.bool or pred.numel() != 1:
        raise ValueError(f"graph_branch needs a one-element bool tensor, got {pred.dtype} of {pred.numel()} elements")
    graph = torch.cuda.CUDAGraph.get_currently_capturing_graph()
    graph.begin_capture_to_if_node(pred)
    try:
        yield
    finally:
        graph.end_capture_to_conditional_node()


def flag_views(row: torch.Tensor) -> torch.Tensor:
    """The int32 entries of ``row`` (1-D, contiguous) as bools: element i of the result is entry i != 0 for entries
    of 0 or 1 (the low byte of a little-endian int32; every CUDA device is little-endian). The builder writes the
    step's flags as int32 in the routes buffer (one host-to-device copy) and the IF nodes read them as bools."""
    if row.dim() != 1 or row.dtype != torch.int32 or row.stride(0) != 1:
        raise ValueError("flag_views needs a contiguous 1-D int32 tensor")
    return row.view(torch.bool)[::4]
