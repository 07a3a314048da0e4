"""CUDA-graph conditional nodes for the decode step (no vLLM import).

A decode step is replayed from a CUDA graph captured once per batch size, so which rows are dense cannot change
what the graph launches: vLLM's FlashAttention runs in every layer even when every row is CAB's (at 128k on the
H200: 8 us per layer for a kernel and its split combine with nothing to do), and CAB's decode launch runs even
when every row is FlashAttention's (2 us per layer). With ``graph_branch`` each of the two is captured inside an
IF node that the replay takes only when the step has rows for it (a flag the metadata builder copies to the
device with the step's routes). PyTorch exposes the nodes (CUDA 12.4+) as
``torch.cuda.CUDAGraph.begin_capture_to_if_node`` (PyTorch 2.13; not 2.11, the torch of vLLM 0.26); each node
adds a one-thread kernel that reads its flag. Where PyTorch lacks them, NVIDIA's CUDA Python bindings (the
``cuda-bindings`` package, 13 or newer) build the same node: a one-thread kernel compiled with NVRTC sets the node's
condition from the flag (``cudaGraphSetConditional`` exists only on the device), the node is added to the graph being
captured, and the body is captured into the node's own graph on a side stream whose allocations go to a private
memory pool of the branches (kept for the process: a replayed body writes into it).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def _cuda_at_least(major: int, minor: int) -> bool:
    return tuple(int(x) for x in (torch.version.cuda or "0.0").split(".")[:2]) >= (major, minor)


def native_nodes_supported() -> bool:
    """Whether this PyTorch itself captures IF nodes: the node methods and the lookup of the graph being captured
    (PyTorch 2.13 has them; 2.11, which vLLM 0.26 pins, has none), built with CUDA 12.4 or newer."""
    g = getattr(torch.cuda, "CUDAGraph", None)
    return g is not None and _cuda_at_least(12, 4) and all(hasattr(g, n) for n in (
        "get_currently_capturing_graph", "begin_capture_to_if_node", "end_capture_to_conditional_node"))


def _bindings_problem() -> str | None:
    """Why NVIDIA's CUDA Python bindings cannot build the nodes here (None: they can)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not _cuda_at_least(12, 4):
        return f"torch is built with CUDA {torch.version.cuda} (12.4+ needed)"
    try:
        from cuda.bindings import __version__ as version
        from cuda.bindings import driver, nvrtc, runtime  # noqa: F401
    except ImportError:
        return "the cuda-bindings package is not installed (pip install 'cuda-bindings>=13')"
    if int(version.split(".")[0]) < 13:
        return f"cuda-bindings {version} is installed (13 or newer needed)"
    if not all(hasattr(torch._C, n) for n in ("_cuda_beginAllocateCurrentThreadToPool", "_cuda_endAllocateToPool")):
        return f"torch {torch.__version__} cannot route a branch's allocations to a memory pool"
    return None


def conditional_nodes_supported() -> bool:
    """Whether IF nodes can be captured here: by PyTorch itself, or through NVIDIA's CUDA Python bindings."""
    return native_nodes_supported() or _bindings_problem() is None


def check_supported() -> None:
    """ValueError naming what is missing when graph branches were asked for and cannot be captured here."""
    if not conditional_nodes_supported():
        raise ValueError(f"CAB_GRAPH_BRANCHES=1 needs CUDA-graph conditional nodes: PyTorch's own "
                         f"(CUDAGraph.begin_capture_to_if_node, PyTorch 2.13+, CUDA 12.4+; torch {torch.__version__} "
                         f"has none) or NVIDIA's CUDA Python bindings ({_bindings_problem()})")


@contextlib.contextmanager
def graph_branch(pred: torch.Tensor) -> Iterator[None]:
    """Capture the body into an IF node of the CUDA graph being captured: at each replay its kernels run only when
    ``pred`` (a one-element bool CUDA tensor, read at replay time) is true. Outside a capture the body just runs."""
    if not (pred.is_cuda and torch.cuda.is_current_stream_capturing()):
        yield
        return
    _check_flag(pred, "graph_branch")
    with _native_branch(pred) if native_nodes_supported() else _bindings_branch(pred):
        yield


def _check_flag(pred: torch.Tensor, who: str) -> None:
    if pred.dtype != torch.bool or pred.numel() != 1:
        raise ValueError(f"{who} needs a one-element bool tensor, got {pred.dtype} of {pred.numel()} elements")


def _device_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


@contextlib.contextmanager
def _native_branch(pred: torch.Tensor) -> Iterator[None]:
    """graph_branch through PyTorch's own IF nodes."""
    graph = torch.cuda.CUDAGraph.get_currently_capturing_graph()
    graph.begin_capture_to_if_node(pred)
    try:
        yield
    finally:
        graph.end_capture_to_conditional_node()


MAX_BRANCHES = 4  # IF nodes one setter launch serves (graph_branches)
_SETTER_SOURCE = r"""
typedef __device_builtin__ unsigned long long cudaGraphConditionalHandle;
extern "C" __device__ __cudart_builtin__ void cudaGraphSetConditional(cudaGraphConditionalHandle handle,
                                                                      unsigned int value);
extern "C" __global__ void cab_set_conditions(int n, cudaGraphConditionalHandle h0, const bool *f0,
                                              cudaGraphConditionalHandle h1, const bool *f1,
                                              cudaGraphConditionalHandle h2, const bool *f2,
                                              cudaGraphConditionalHandle h3, const bool *f3) {
    cudaGraphSetConditional(h0, *f0 ? 1u : 0u);
    if (n > 1) cudaGraphSetConditional(h1, *f1 ? 1u : 0u);
    if (n > 2) cudaGraphSetConditional(h2, *f2 ? 1u : 0u);
    if (n > 3) cudaGraphSetConditional(h3, *f3 ? 1u : 0u);
}
"""
_SETTERS: dict = {}  # device index -> (module, kernel, its PTX): compiled once per device
_KEEP: list = []  # per node: the launch arguments and node parameters (the graphs hold them for good)
_POOL: dict = {}  # device index -> the branches' private memory pool
_SIDE: dict = {}  # device index -> the stream bodies are captured on (a stream of its own, made once, kept)


def _ok(result):
    """The values of a cuda-bindings call (its first element is the status), or RuntimeError with the status."""
    err, *values = result
    if int(err) != 0:
        raise RuntimeError(f"CUDA graph branch: a CUDA call failed with {err!r}")
    return values[0] if len(values) == 1 else tuple(values)


def _setter(device: int):
    """The NVRTC-compiled kernel that sets IF nodes' conditions from bool flags (compiled once per device, for its
    compute capability)."""
    got = _SETTERS.get(device)
    if got is not None:
        return got[1]
    from cuda.bindings import driver, nvrtc

    major, minor = torch.cuda.get_device_capability(device)
    opts = [f"--gpu-architecture=compute_{major}{minor}".encode()]
    prog = _ok(nvrtc.nvrtcCreateProgram(_SETTER_SOURCE.encode(), b"cab_set_conditions.cu", 0, [], []))
    try:
        err = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]
        if int(err) != 0:
            size = _ok(nvrtc.nvrtcGetProgramLogSize(prog))
            log = b" " * size
            _ok(nvrtc.nvrtcGetProgramLog(prog, log))
            raise RuntimeError(f"CUDA graph branch: NVRTC could not compile the condition setter: {log.decode()}")
        size = _ok(nvrtc.nvrtcGetPTXSize(prog))
        ptx = b" " * size
        _ok(nvrtc.nvrtcGetPTX(prog, ptx))
    finally:
        _ok(nvrtc.nvrtcDestroyProgram(prog))
    import numpy as np

    image = np.frombuffer(ptx, dtype=np.uint8).copy()
    module = _ok(driver.cuModuleLoadData(image.ctypes.data))
    kernel = _ok(driver.cuModuleGetFunction(module, b"cab_set_conditions"))
    _SETTERS[device] = (module, kernel, image)
    return kernel


def _bindings_prepare(preds) -> list:
    """Through cuda-bindings, for the flags ``preds``: one conditional handle each in the graph being captured
    (reset to 0 at every launch of the graph) and ONE launch of the setter kernel that sets all of them from their
    flags, captured on the current stream. Returns the handles, for _bindings_branch."""
    import numpy as np
    from cuda.bindings import driver, runtime

    problem = _bindings_problem()
    if problem is not None:
        raise RuntimeError(f"CUDA graph branch: {problem}")
    if not 1 <= len(preds) <= MAX_BRANCHES:
        raise ValueError(f"graph_branches takes 1 to {MAX_BRANCHES} flags, got {len(preds)}")
    dev = _device_index(preds[0])
    kernel = _setter(dev)
    parent = torch.cuda.current_stream(preds[0].device)
    status, _, graph, *_ = _ok(runtime.cudaStreamGetCaptureInfo(parent.cuda_stream))
    if status != runtime.cudaStreamCaptureStatus.cudaStreamCaptureStatusActive:
        raise RuntimeError("CUDA graph branch: the current stream is not capturing")
    handles = [_ok(runtime.cudaGraphConditionalHandleCreate(graph, 0, 1)) for _ in preds]
    values = [np.array([len(preds)], dtype=np.int32)]
    for i in range(MAX_BRANCHES):
        h, p = (handles[i], preds[i]) if i < len(preds) else (handles[0], preds[0])
        values += [np.array([int(h)], dtype=np.uint64), np.array([p.data_ptr()], dtype=np.uint64)]
    args = np.array([v.ctypes.data for v in values], dtype=np.uint64)
    _ok(driver.cuLaunchKernel(kernel, 1, 1, 1, 1, 1, 1, 0, parent.cuda_stream, args.ctypes.data, 0))
    _KEEP.append((values, args, list(preds)))
    return handles


def graph_branches(*preds: torch.Tensor) -> list:
    """One context manager per flag in ``preds`` (one-element bool CUDA tensors), each capturing its body into an
    IF node as graph_branch does. Through the CUDA Python bindings one setter launch sets every node's condition (a
    layer's two branches cost one extra kernel in the graph, not two); with PyTorch's own nodes each sets its own."""
    for p in preds:
        _check_flag(p, "graph_branches")
    capturing = all(p.is_cuda for p in preds) and torch.cuda.is_current_stream_capturing()
    if not capturing or native_nodes_supported():
        return [graph_branch(p) for p in preds]
    return [_bindings_branch(p, h) for p, h in zip(preds, _bindings_prepare(preds))]


@contextlib.contextmanager
def _bindings_branch(pred: torch.Tensor, handle=None) -> Iterator[None]:
    """graph_branch through cuda-bindings: an IF node after the setter's launch (made here unless ``handle`` comes
    from _bindings_prepare), the body captured into the node's graph on a side stream (made current meanwhile),
    its allocations in the branches' private pool."""
    from cuda.bindings import driver, runtime

    if handle is None:
        handle = _bindings_prepare([pred])[0]
    dev = _device_index(pred)
    parent = torch.cuda.current_stream(pred.device)
    _, _, graph, deps, *_ = _ok(runtime.cudaStreamGetCaptureInfo(parent.cuda_stream))
    params = driver.CUgraphNodeParams()
    params.type = driver.CUgraphNodeType.CU_GRAPH_NODE_TYPE_CONDITIONAL
    params.conditional.handle = handle
    params.conditional.type = driver.CUgraphConditionalNodeType.CU_GRAPH_COND_TYPE_IF
    params.conditional.size = 1
    params.conditional.ctx = _ok(driver.cuCtxGetCurrent())
    node = _ok(driver.cuGraphAddNode(graph, deps, None, len(deps), params))
    body = params.conditional.phGraph_out[0]
    _ok(runtime.cudaStreamUpdateCaptureDependencies(
        parent.cuda_stream, [node], None, 1,
        runtime.cudaStreamUpdateCaptureDependenciesFlags.cudaStreamSetCaptureDependencies))
    side = _side_stream(dev)
    _KEEP.append(params)
    pool = _POOL.get(dev)
    if pool is None:
        pool = _POOL[dev] = torch.cuda.graph_pool_handle()
    _ok(runtime.cudaStreamBeginCaptureToGraph(side.cuda_stream, body, None, None, 0,
                                               runtime.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
    torch._C._cuda_beginAllocateCurrentThreadToPool(dev, pool)
    torch.cuda.set_stream(side)
    try:
        yield
    finally:
        torch.cuda.set_stream(parent)
        torch._C._cuda_endAllocateToPool(dev, pool)
        _ok(runtime.cudaStreamEndCapture(side.cuda_stream))


def _side_stream(device: int) -> torch.cuda.ExternalStream:
    """The stream branch bodies are captured on: created through the runtime once per device, never one of
    PyTorch's pooled streams (``torch.cuda.Stream()`` hands out 32 streams round-robin, and vLLM captures its graphs
    on one of them: after enough layers a pooled side stream is the capturing stream itself, and the runtime
    refuses to begin a second capture on it)."""
    side = _SIDE.get(device)
    if side is None:
        from cuda.bindings import runtime

        with torch.cuda.device(device):
            handle = _ok(runtime.cudaStreamCreateWithFlags(runtime.cudaStreamNonBlocking))
        side = _SIDE[device] = torch.cuda.ExternalStream(int(handle), device=torch.device("cuda", device))
    return side


def flag_views(row: torch.Tensor) -> torch.Tensor:
    """The int32 entries of ``row`` (1-D, contiguous) as bools: element i of the result is entry i != 0 for entries
    of 0 or 1 (the low byte of a little-endian int32; every CUDA device is little-endian). The builder writes the
    step's flags as int32 in the routes buffer (one host-to-device copy) and the IF nodes read them as bools."""
    if row.dim() != 1 or row.dtype != torch.int32 or row.stride(0) != 1:
        raise ValueError("flag_views needs a contiguous 1-D int32 tensor")
    return row.view(torch.bool)[::4]
