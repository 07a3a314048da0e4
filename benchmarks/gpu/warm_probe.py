import os, sys, torch
from cab_vllm.backend.planner import DecodeWorkspace
from cab_vllm.backend.warmup import warm_up_kernels
from cab_vllm.config import CABConfig
ws = DecodeWorkspace(int(sys.argv[1]), 32, 8, 128, int(sys.argv[2]), "cuda")
warm_up_kernels(32, 8, 128, torch.bfloat16, "cuda", CABConfig(sparsity=0.95), ws)
print("warm ok")
