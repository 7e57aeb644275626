"""Qwen3-MoE: the same decoder as qwen3.py, with sparse mixture-of-experts blocks in place of MLPs.

Shape letters as in qwen3.py, plus: E experts, K experts chosen per token, M = B*T tokens.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from qwen3 import Linear, Qwen3Config, Qwen3ForCausalLM, linear


@dataclass
class Qwen3MoeConfig(Qwen3Config):
    hidden_size: int = 2048
    intermediate_size: int = 6144  # of the dense MLP in layers that are not sparse
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768  # of each expert
    decoder_sparse_step: int = 1  # every n-th layer is sparse
    mlp_only_layers: list[int] = field(default_factory=list)  # these layers stay dense
    norm_topk_prob: bool = False  # renormalise the K chosen probabilities to sum to 1
    router_aux_loss_coef: float = 0.001

    def is_sliding(self, layer_idx: int) -> bool:
        return self.use_sliding_window  # the reference slides in every MoE layer; max_window_layers is unused

    def make_mlp(self, layer_idx: int) -> nn.Module:
        if layer_idx not in self.mlp_only_layers and (layer_idx + 1) % self.decoder_sparse_step == 0:
            return SparseMoE(self)
        return super().make_mlp(layer_idx)


Qwen3MoeConfig.RELEASED = dict(num_key_value_heads=4, norm_topk_prob=True)
Qwen3MoeConfig.PRESET_FIELDS = ("hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                                "num_attention_heads")
Qwen3MoeConfig.PRESETS = {"30B-A3B": (2048, 6144, 768, 48, 32), "235B-A22B": (4096, 12288, 1536, 94, 64)}


class Experts(nn.Module):
    """E SwiGLU MLPs, stacked as transformers keeps them in memory: gate and up side by side in one matrix per
    expert, so an expert costs two matrix products. (Checkpoints store them one by one; load_weights stacks them.)"""

    def __init__(self, config: Qwen3MoeConfig):
        super().__init__()
        E, C, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, C).normal_(0, 0.02))
        self.down_proj = nn.Parameter(torch.empty(E, C, I).normal_(0, 0.02))

    def forward(self, x, e: int):
        """x [n, C], the tokens routed to expert e -> [n, C]."""
        gate, up = linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)  # [n, I] each
        return linear(F.silu(gate) * up, self.down_proj[e])


class SparseMoE(nn.Module):
    """A router picks K of E SwiGLU experts per token; the output is their weighted sum."""

    def __init__(self, config: Qwen3MoeConfig):
        super().__init__()
        self.gate = Linear(config.hidden_size, config.num_experts, bias=False)  # the router
        self.experts = Experts(config)
        self.num_experts, self.top_k = config.num_experts, config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.router_logits = None  # of the last call, for output_router_logits and routing statistics

    def forward(self, x):
        B, T, C = x.shape
        x = x.view(-1, C)  # [M, C]
        self.router_logits = self.gate(x)  # [M, E]
        probs = F.softmax(self.router_logits, dim=-1, dtype=torch.float32)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [M, K]
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        # Sort the M*K (token, expert) pairs by expert, so each expert takes its tokens as one contiguous slice.
        order = chosen.flatten().argsort(stable=True)  # [M*K]
        token = order // self.top_k  # [M*K] the token of each pair
        counts = chosen.flatten().bincount(minlength=self.num_experts).tolist()  # [E] tokens per expert
        outs, start = [], 0
        for e, n in enumerate(counts):  # only the experts some token was routed to do any work
            if n:
                outs.append(self.experts(x[token[start:start + n]], e))  # [n, C]
            start += n
        weighted = torch.cat(outs) * weights.flatten()[order, None].to(x.dtype)  # [M*K, C]
        return torch.zeros_like(x).index_add_(0, token, weighted).view(B, T, C)  # sum per token -> [B, T, C]


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    def forward(self, input_ids, cache=None, pos=0, last_only=False, output_router_logits=False):
        """-> logits, or (logits, router logits [M, E] of each sparse layer) with output_router_logits."""
        logits = super().forward(input_ids, cache, pos, last_only)
        routers = [layer.mlp.router_logits for layer in self.model.layers if isinstance(layer.mlp, SparseMoE)]
        return (logits, routers) if output_router_logits else logits


def load_balancing_loss(router_logits, num_experts: int, top_k: int, attention_mask=None):
    """Switch-Transformer auxiliary loss, as transformers computes it: E * sum_e (share of picks of e) * (mean
    probability of e), pooled over all sparse layers; tokens where attention_mask [B, T] is 0 do not count."""
    picks, probs, rows = torch.zeros(num_experts), torch.zeros(num_experts), 0.0
    for logits in router_logits:  # [M, E] per layer
        p = F.softmax(logits.cpu(), dim=-1).float()
        keep = torch.ones(len(p)) if attention_mask is None else attention_mask.reshape(-1).float().cpu()  # [M]
        chosen = p.topk(top_k, dim=-1).indices  # [M, K]
        picks.scatter_add_(0, chosen.reshape(-1), keep.repeat_interleave(top_k))  # each pick counts its token
        probs += (p * keep[:, None]).sum(0)
        rows += keep.sum()
    return num_experts * torch.sum((picks / rows) * (probs / rows))
