"""CUDA-graph IF nodes around a layer's two attention launches (cab_vllm.backend.graphs), on a GPU (marked gpu):
a captured branch runs at replay exactly when its flag is set, flags written after capture are the ones read,
and CAB's decode launch (Triton) inside a branch gives the same output as outside one."""

from __future__ import annotations

import pytest
import torch

from cab_vllm.backend.graphs import conditional_nodes_supported, flag_views, graph_branch, graph_branches

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

needs_nodes = pytest.mark.skipif(not conditional_nodes_supported(), reason="this torch has no CUDA-graph IF nodes")


def _capture(fn, stream: torch.cuda.Stream | None = None) -> torch.cuda.CUDAGraph:
    """fn warmed up outside a capture (allocations, Triton compilation), then captured (on ``stream`` if given)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
        fn()
    return g


def test_this_torch_has_conditional_nodes_or_the_option_says_so():
    """Where PyTorch lacks the nodes (2.11 on the H200 machine) the option fails by name; the two tests below need
    them."""
    from cab_vllm.backend.graphs import check_supported

    if conditional_nodes_supported():
        check_supported()
    else:
        with pytest.raises(ValueError, match="CAB_GRAPH_BRANCHES=1 needs CUDA-graph conditional nodes"):
            check_supported()


@needs_nodes
def test_each_branch_runs_only_when_its_flag_is_set_at_replay():
    routes = torch.zeros(8, dtype=torch.int32, device="cuda")
    flags = flag_views(routes)
    x = torch.zeros(4, device="cuda")

    def step():
        with graph_branch(flags[1:2]):
            x.add_(1.0)
        with graph_branch(flags[2:3]):
            x.add_(10.0)

    g = _capture(step)
    for fa, cab in [(1, 0), (0, 1), (1, 1), (0, 0), (1, 0)]:
        x.zero_()
        routes[1:3] = torch.tensor([fa, cab], dtype=torch.int32, device="cuda")  # as the builder's copy does
        g.replay()
        torch.cuda.synchronize()
        assert x.tolist() == [fa * 1.0 + cab * 10.0] * 4


@needs_nodes
def test_a_pair_of_branches_from_one_setter_runs_each_on_its_own_flag():
    """graph_branches (the backend's FlashAttention / CAB pair): each body, which allocates, runs at replay exactly
    when its flag is set; flags written after capture are the ones read."""
    routes = torch.zeros(8, dtype=torch.int32, device="cuda")
    flags = flag_views(routes)
    x = torch.zeros(4, device="cuda")

    def step():
        first, second = graph_branches(flags[1:2], flags[2:3])
        with first:
            x.add_(torch.ones(4, device="cuda"))  # a temporary allocated inside the body
        with second:
            x.add_(torch.full((4,), 10.0, device="cuda"))

    g = _capture(step)
    for fa, cab in [(1, 0), (0, 1), (1, 1), (0, 0), (1, 1)]:
        x.zero_()
        routes[1:3] = torch.tensor([fa, cab], dtype=torch.int32, device="cuda")
        g.replay()
        torch.cuda.synchronize()
        assert x.tolist() == [fa * 1.0 + cab * 10.0] * 4


@needs_nodes
def test_forty_layers_of_branch_pairs_captured_on_a_pooled_stream_as_vllm_does():
    """vLLM captures on a stream from PyTorch's pool (32 streams handed out round-robin): 40 layers' pairs of
    branches (80 bodies, more than the pool) capture and replay, each layer's bodies on their own flags; the side
    stream is made inside the capture, as at an engine's first capture."""
    from cab_vllm.backend import graphs

    graphs._SIDE.clear()
    layers = 40
    routes = torch.zeros(8, dtype=torch.int32, device="cuda")
    flags = flag_views(routes)
    x = torch.zeros(layers, device="cuda")

    def step():
        for i in range(layers):
            first, second = graph_branches(flags[1:2], flags[2:3])
            with first:
                x[i:i + 1].add_(1.0)
            with second:
                x[i:i + 1].add_(torch.full((1,), 10.0, device="cuda"))

    g = _capture(step, stream=torch.cuda.Stream())  # a pooled stream, as vLLM's capture stream is
    for fa, cab in [(1, 0), (0, 1), (0, 0), (1, 1)]:
        x.zero_()
        routes[1:3] = torch.tensor([fa, cab], dtype=torch.int32, device="cuda")
        g.replay()
        torch.cuda.synchronize()
        assert x.tolist() == [fa * 1.0 + cab * 10.0] * layers


@needs_nodes
def test_the_decode_launch_inside_a_branch_matches_the_eager_launch():
    from cab_vllm.ops.decode import MODE_ALL, MODE_PROMPT, DecodeRoutes, routed_decode

    torch.manual_seed(0)
    rows, hq, hkv, d, bs, pages = 3, 8, 2, 64, 64, 40
    kc = torch.randn(pages, bs, hkv, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    bt = torch.randperm(pages, device="cuda", dtype=torch.int32)[: rows * 12].view(rows, 12)
    sl = torch.tensor([700, 123, 650], device="cuda", dtype=torch.int32)
    q = torch.randn(rows, hq, d, device="cuda", dtype=torch.bfloat16)
    z = torch.zeros(rows, dtype=torch.int32, device="cuda")
    tab_idx = torch.tensor([[[0, 3, 5, 0]] * hkv] * rows, dtype=torch.int32, device="cuda")
    tab_cnt = torch.full((rows, hkv), 3, dtype=torch.int32, device="cuda")
    routes = DecodeRoutes(torch.tensor([MODE_PROMPT, MODE_ALL, 0], dtype=torch.int32, device="cuda"),
                          torch.arange(rows, dtype=torch.int32, device="cuda"), tab_idx, tab_cnt,
                          torch.tensor([8, 2, 10], dtype=torch.int32, device="cuda"),
                          torch.zeros(rows, hkv, 4, dtype=torch.int32, device="cuda"), z.view(rows, 1)[:, :1].repeat(1, hkv))
    want = routed_decode(q, kc, vc, bt, sl, routes, bs, 0.125, torch.zeros_like(q), 4, impl="triton")
    torch.cuda.synchronize()
    flag = torch.zeros(4, dtype=torch.int32, device="cuda")
    out = torch.zeros_like(q)

    def step():
        with graph_branch(flag_views(flag)[1:2]):
            routed_decode(q, kc, vc, bt, sl, routes, bs, 0.125, out, 4, impl="triton")

    g = _capture(step)
    out.zero_()
    g.replay()
    torch.cuda.synchronize()
    assert bool((out == 0).all())  # flag clear: the launch is skipped
    flag[1] = 1
    g.replay()
    torch.cuda.synchronize()
    live = routes.modes != 0
    torch.testing.assert_close(out[live], want[live], rtol=0, atol=0)
