# TEMPORARY experiment wrapper (delete before commit): patches llama then runs bench_train.main
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import bench_train  # noqa: E402

from lowbit.models import llama  # noqa: E402

exp = set(filter(None, os.environ.get("LOWBIT_EXP", "").split(",")))


def attn_fwd(self, x, cos, sin):
    B, T, _ = x.shape
    hq, hkv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
    w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
    q, k, v = F.linear(x, w).split([hq, hkv, hkv], dim=-1)
    q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
    k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
    v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
    q, k = llama.apply_rope(q, cos, sin), llama.apply_rope(k, cos, sin)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
    return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def mlp_fwd(self, x):
    w = torch.cat([self.gate_proj.weight, self.up_proj.weight])
    g, u = F.linear(x, w).chunk(2, dim=-1)
    return self.down_proj(F.silu(g) * u)


if "fused" in exp or "fusedqkv" in exp:
    llama.Attention.forward = attn_fwd
if "fused" in exp or "fusedmlp" in exp:
    llama.MLP.forward = mlp_fwd
print("experiments:", sorted(exp), flush=True)
bench_train.main(sys.argv[1:])
