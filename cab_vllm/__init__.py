"""CAB-vLLM: curvature-aware block-sparse attention for long-context serving.

    cfg = cab_vllm.CABConfig(sparsity=0.95, policy="cab")
    sel = cab_vllm.select_blocks(q, k, cfg)        # q [B,Hq,N,D], k [B,Hkv,N,D]
    sel.indices, sel.counts                        # [B,Hkv,M,K] int32, [B,Hkv,M] int32 (Hsel = Hkv)
    out = cab_vllm.sparse_attention(q, k, v, sel)  # [B,Hq,N,D]
"""

from cab_vllm.api import Selection, select_blocks, sparse_attention
from cab_vllm.config import ESTIMATORS, POLICIES, CABConfig

__all__ = ["CABConfig", "Selection", "select_blocks", "sparse_attention", "POLICIES", "ESTIMATORS"]
__version__ = "0.1.0"
