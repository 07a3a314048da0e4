"""The seed's sanity check: which policies keep a needle block that the last query reaches only through a
low-weight bridge between two dense communities?

Graph (one [1, 1, 100, 100] causal, row-stochastic block graph A):
  block 0         the sink: every row i >= 1 sends it SINK of its mass.
  blocks 1..49    community C1: row i spreads its remaining mass uniformly over C1 blocks <= i.
  blocks 50..99   community C2: likewise over C2 blocks <= i (no edge to C1).
  last row (99)   SINK to the sink, BRIDGE to the needle (block 10 in C1), the rest uniformly over C2.
The needle is reachable from the last row only through the bridge edge. At sparsity 0.9 the last row keeps
10 blocks: sink + diagonal + 8 free picks.
"""

from __future__ import annotations

import json

import torch

from cab_vllm.config import POLICIES, CABConfig
from cab_experiments.bridge import BRIDGE, M, NEEDLE, SINK, SPLIT, bridge_graph, curvature64
from cab_vllm.policies import select_from_attention


def test_graph_is_causal_row_stochastic():
    a = bridge_graph()
    assert torch.allclose(a.sum(-1), torch.ones(M, dtype=torch.float64))
    assert (a.triu(1) == 0).all()


def test_bridge_needle(tmp_path):
    a64 = bridge_graph()
    a = a64.float()[None, None]
    base = CABConfig(sparsity=0.9, sink_blocks=1, local_blocks=1)
    keep_last = int(base.keep_counts(M)[-1])
    free = keep_last - 2  # sink 0 and the diagonal 99 are forced
    assert (keep_last, free) == (10, 8)

    settings = {p: base.replace(policy=p) for p in POLICIES}
    settings["cab+curvature_share=1"] = base.replace(policy="cab", curvature_share=1.0)
    settings["cab+curvature_share=0.5"] = base.replace(policy="cab", curvature_share=0.5)
    record: dict[str, dict] = {}
    for name, cfg in settings.items():
        idx, cnt = select_from_attention(a, a, cfg, impl="torch")
        last = idx[0, 0, -1, : int(cnt[0, 0, -1])].tolist()
        record[name] = {"keeps_needle": NEEDLE in last, "last_row_blocks": last if len(last) < M else "all"}

    # where the needle ranks among the 98 free candidates of the last row, by each score
    f = curvature64(a64)[M - 1]
    cand = [j for j in range(1, M - 1)]
    rank_by = {
        "most_negative_curvature": sorted(cand, key=lambda j: f[j].item()).index(NEEDLE) + 1,
        "attention_mass": sorted(cand, key=lambda j: -a64[M - 1, j].item()).index(NEEDLE) + 1,
        "accumulated_mass_h2o": sorted(cand, key=lambda j: -a64[:, j].sum().item()).index(NEEDLE) + 1,
    }
    report = {
        "graph": {"M": M, "communities": [[1, SPLIT - 1], [SPLIT, M - 1]], "needle": NEEDLE, "bridge_weight": BRIDGE,
                  "sink_weight": SINK, "sparsity": 0.9, "last_row_keep": keep_last, "free_slots": free},
        "needle_rank_among_free_candidates": rank_by,
        "needle_curvature": f[NEEDLE].item(),
        "most_negative_curvature_last_row": sorted((round(f[j].item(), 4), j) for j in cand)[:free],
        "policies": record,
    }
    text = json.dumps(report, indent=None, separators=(", ", ": ")).replace('}, "', '},\n "')
    (tmp_path / "bridge.json").write_text(text)
    print(text)

    # dense keeps everything, the needle included
    assert record["dense"]["keeps_needle"]
    # streaming keeps sink + the 9 most recent blocks: never block 10
    assert not record["streaming"]["keeps_needle"]
    assert record["streaming"]["last_row_blocks"] == [0] + list(range(M - 9, M))
    # magnitude / cab rank by attention mass: the bridge (0.01) is below every C2 edge (0.89 / 50 = 0.0178)
    for name in ("magnitude", "cab"):
        assert not record[name]["keeps_needle"], name
    # h2o: a recent window + the heaviest column sums; the needle's in-degree is below the early blocks of
    # both communities
    assert not record["h2o"]["keeps_needle"]
    # curvature: F = 4A + 3T - D_i - D_j. With row-stochastic rows D_i = 1 and the bridge's 4A + 3T is tiny,
    # so F ranks like the column sum D_j: the early blocks of both communities (large in-degree) are more
    # negative than the needle. Most-negative curvature does NOT keep the bridge's endpoint here.
    assert rank_by["most_negative_curvature"] > free
    assert not record["curvature"]["keeps_needle"]
    assert not record["cab+curvature_share=1"]["keeps_needle"]
    # the blocks curvature keeps are exactly the free candidates of largest column sum (in-degree)
    by_f = sorted(cand, key=lambda j: f[j].item())[:free]
    by_in_degree = sorted(cand, key=lambda j: -a64[:, j].sum().item())[:free]
    assert set(by_f) == set(by_in_degree)
    assert set(record["curvature"]["last_row_blocks"]) == {0, M - 1} | set(by_f)
    # the needle is kept by a policy iff its score rank fits the free budget (consistency of the record)
    assert record["magnitude"]["keeps_needle"] == (rank_by["attention_mass"] <= free)


def test_curvature_keeps_a_high_in_degree_needle():
    """Control: put the needle at block 1, the C1 block with the largest in-degree. Now most-negative curvature
    keeps it although the last row reaches it by the same weak bridge, which shows the curvature policy
    follows in-degree, not bridge structure."""
    a = bridge_graph()
    a[M - 1, NEEDLE] = 0.0
    a[M - 1, 1] = BRIDGE
    a = a.float()[None, None]
    cfg = CABConfig(policy="curvature", sparsity=0.9, sink_blocks=1, local_blocks=1)
    idx, cnt = select_from_attention(a, a, cfg, impl="torch")
    assert 1 in idx[0, 0, -1, : int(cnt[0, 0, -1])].tolist()
    mag_idx, mag_cnt = select_from_attention(a, a, cfg.replace(policy="magnitude"), impl="torch")
    assert 1 not in mag_idx[0, 0, -1, : int(mag_cnt[0, 0, -1])].tolist()
