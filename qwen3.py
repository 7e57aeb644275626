"""Qwen3: the config, the dense decoder-only model and its task heads, in plain PyTorch.

Read top to bottom: config, RMSNorm, RoPE, attention, MLP, decoder layer, model, heads.
Shape letters used in comments:
  B batch, T new tokens, S keys visible (cached + new), C hidden size,
  H query heads, N key/value heads, D head dim, V vocabulary, L labels.
"""
import json
import math
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Qwen3Config:
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32  # fewer than attention heads = grouped-query attention
    head_dim: int = 128  # not always hidden_size / num_attention_heads
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    use_sliding_window: bool = False
    sliding_window: int = 4096
    max_window_layers: int = 28  # layers from this index on slide, when use_sliding_window
    tie_word_embeddings: bool = False  # the LM head reuses the embedding matrix
    pad_token_id: int | None = None  # sequence classification pools at the last non-pad token
    num_labels: int = 2  # classification heads only

    @classmethod
    def from_name(cls, name: str):
        """A released model: its row of PRESETS, over what every released Qwen3 shares."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(cls.PRESETS)}")
        preset = dict(zip(cls.PRESET_FIELDS, cls.PRESETS[name]))
        return cls(vocab_size=151936, head_dim=128, max_position_embeddings=40960, rope_theta=1e6,
                   max_window_layers=preset["num_hidden_layers"], **cls.RELEASED, **preset)

    @classmethod
    def from_hf(cls, source):
        """Read a Hugging Face config.json (a path, a folder or a dict), in the hub or transformers-5 format."""
        if not isinstance(source, dict):
            source = json.loads((Path(source) / "config.json" if Path(source).is_dir() else Path(source)).read_text())
        d = dict(source)
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}  # transformers 5 nests rope_theta here
        d.setdefault("rope_theta", rope.get("rope_theta"))
        kind = rope.get("rope_type", rope.get("type", "default"))
        scaling = {k: v for k, v in rope.items() if k not in ("type", "rope_theta")}
        d["rope_scaling"] = {**scaling, "rope_type": kind} if kind != "default" else None
        d.setdefault("num_experts", d.get("num_local_experts"))
        d["num_labels"] = len(d.get("id2label") or {}) or d.get("num_labels")  # heads save their labels
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known and (v is not None or k == "rope_scaling")})

    def is_sliding(self, layer_idx: int) -> bool:
        return self.use_sliding_window and layer_idx >= self.max_window_layers

    def make_mlp(self, layer_idx: int) -> nn.Module:
        # The one place where MoE differs: moe.Qwen3MoeConfig returns a sparse block here.
        return MLP(self.hidden_size, self.intermediate_size)


Qwen3Config.RELEASED = dict(num_key_value_heads=8)  # besides the shared values in from_name
Qwen3Config.PRESET_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                             "tie_word_embeddings")
Qwen3Config.PRESETS = {
    "0.6B": (1024, 3072, 28, 16, True), "1.7B": (2048, 6144, 28, 16, True), "4B": (2560, 9728, 36, 32, True),
    "8B": (4096, 12288, 36, 32, False), "14B": (5120, 17408, 40, 40, False), "32B": (5120, 25600, 64, 64, False),
}


def linear(x, weight, bias=None):
    """F.linear, steered to PyTorch's fastest CPU kernels (the results are the same):
    - float32: PyTorch's matrix-vector product runs on one core and its matrix product shares the cores poorly;
      multiplying by 4 row blocks of the weight as one batched product keeps every core busy (decode ~1.8x);
    - bfloat16 or float16 with one row: PyTorch's own kernel is about twice as fast as oneDNN's there."""
    N, K = weight.shape
    if x.device.type == "cpu" and x.dtype == torch.float32 and N % 4 == 0:
        y = x.reshape(1, -1, K) @ weight.reshape(4, N // 4, K).transpose(1, 2)  # [4, rows, N/4]
        y = y.transpose(0, 1).reshape(*x.shape[:-1], N)  # [..., N]
        return y if bias is None else y + bias
    if x.device.type == "cpu" and x.numel() == K:
        mkldnn, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, False
        y = F.linear(x, weight, bias)
        torch.backends.mkldnn.enabled = mkldnn
        return y
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    def forward(self, x):
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # x / sqrt(mean(x**2) + eps) in float32, so bf16 activations keep their precision; scaled in the input dtype
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_frequencies(config: Qwen3Config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [D/2] in float32 and the factor cos/sin are scaled by (YaRN's attention factor)."""
    D, base = config.head_dim, config.rope_theta
    # Built on the CPU on purpose: even a model on the meta device needs real frequencies.
    pos_freqs = base ** (torch.arange(0, D, 2, dtype=torch.float32, device="cpu") / D)
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") != "yarn":
        return 1.0 / pos_freqs, 1.0
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]

    def dim_of(rotations):  # the dimension that turns `rotations` times over the original context
        return D * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    # YaRN: dimensions that rotate fast keep their frequency, slow ones are interpolated by `factor`,
    # with a linear ramp in between.
    low = max(math.floor(dim_of(scaling.get("beta_fast") or 32)), 0)
    high = min(math.ceil(dim_of(scaling.get("beta_slow") or 1)), D - 1)
    ramp = ((torch.arange(D // 2, dtype=torch.float32, device="cpu") - low) / ((high - low) or 0.001)).clamp(0, 1)
    inv_freq = 1.0 / (factor * pos_freqs) * ramp + 1.0 / pos_freqs * (1 - ramp)
    return inv_freq, scaling.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)


def apply_rope(x, cos, sin):
    """Rotate pairs (i, i + D/2) of x [B, H, T, D] by the angles whose cos/sin are [T, D]."""
    x1, x2 = x.chunk(2, dim=-1)  # [B, H, T, D/2] each
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Keys and values of every layer, preallocated for max_len positions: [B, N, max_len, D] each, in float32
    whatever the weights, since attention runs in float32 (see Attention)."""

    def __init__(self, config: Qwen3Config, batch_size: int, max_len: int, device="cpu"):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.empty(shape, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.empty(shape, device=device) for _ in range(config.num_hidden_layers)]

    def update(self, layer_idx: int, k, v, pos: int):
        """Store k, v [B, N, T, D] at positions pos.. and return all keys and values so far [B, N, S, D]."""
        end = pos + k.shape[2]
        self.k[layer_idx][:, :, pos:end] = k
        self.v[layer_idx][:, :, pos:end] = v
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int):
        super().__init__()
        C, H, N, D = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = Linear(C, H * D, bias=config.attention_bias)
        self.k_proj = Linear(C, N * D, bias=config.attention_bias)
        self.v_proj = Linear(C, N * D, bias=config.attention_bias)
        self.o_proj = Linear(H * D, C, bias=config.attention_bias)
        # QK-norm: one RMSNorm over head_dim, shared by all heads, keeps attention logits bounded.
        self.q_norm = RMSNorm(D, config.rms_norm_eps)
        self.k_norm = RMSNorm(D, config.rms_norm_eps)
        self.layer_idx, self.head_dim = layer_idx, D

    def forward(self, x, cos, sin, mask, cache: KVCache | None, pos: int):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, -1, self.head_dim)).transpose(1, 2)  # [B, H, T, D]
        k = self.k_norm(self.k_proj(x).view(B, T, -1, self.head_dim)).transpose(1, 2)  # [B, N, T, D]
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, N, T, D]
        # Attention runs in float32, like the reference's fused kernels do inside (and bf16 attention on the CPU is
        # several times slower); the values of q, k and v are those of the model's dtype.
        q, k, v = apply_rope(q, cos, sin).float(), apply_rope(k, cos, sin).float(), v.float()
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, pos)  # [B, N, S, D]
        # enable_gqa: each group of H/N query heads shares one key/value head, without copying k and v.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).to(x.dtype)  # [B, H, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))  # [B, T, C]


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = config.make_mlp(layer_idx)
        self.sliding = config.is_sliding(layer_idx)

    def forward(self, x, cos, sin, mask, cache, pos):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # A plain tensor, not a buffer: model.to(torch.bfloat16) must not round the frequencies.
        self.inv_freq, self.rope_factor = rope_frequencies(config)
        self.window = config.sliding_window

    def forward(self, input_ids, cache: KVCache | None = None, pos: int = 0):
        """input_ids [B, T] at positions pos.. (pos > 0 needs the cache of the earlier ones) -> [B, T, C]."""
        x = self.embed_tokens(input_ids)  # [B, T, C]
        positions = torch.arange(pos, pos + input_ids.shape[1], device=x.device)  # [T]
        angles = positions[:, None].float() * self.inv_freq.to(x.device)  # [T, D/2]
        angles = torch.cat((angles, angles), dim=-1)  # [T, D]
        cos, sin = (angles.cos() * self.rope_factor).to(x.dtype), (angles.sin() * self.rope_factor).to(x.dtype)
        keys = torch.arange(pos + input_ids.shape[1], device=x.device)  # [S]
        full = keys <= positions[:, None]  # [T, S] causal: each token sees itself and the past
        sliding = full & (keys > positions[:, None] - self.window)
        full = None if len(positions) == 1 else full  # one new token sees every key: no mask is faster
        for layer in self.layers:
            x = layer(x, cos, sin, sliding if layer.sliding else full, cache, pos)
        return self.norm(x)


class TaskModel(nn.Module):
    """A Qwen3Model backbone under one linear layer, named as in Hugging Face checkpoints."""

    def __init__(self, config: Qwen3Config, head: str, out_features: int, bias: bool):
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config)
        setattr(self, head, Linear(config.hidden_size, out_features, bias=bias))


class Qwen3ForCausalLM(TaskModel):
    def __init__(self, config: Qwen3Config):
        super().__init__(config, "lm_head", config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self):
        """Small models reuse the embedding matrix as the LM head (checkpoints then store it once)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, cache: KVCache | None = None, pos: int = 0, last_only: bool = False):
        """-> logits [B, T, V]; with last_only, [B, 1, V] (all that generation needs)."""
        h = self.model(input_ids, cache, pos)
        return self.lm_head(h[:, -1:] if last_only else h)


class Qwen3ForSequenceClassification(TaskModel):
    def __init__(self, config: Qwen3Config):
        super().__init__(config, "score", config.num_labels, bias=False)

    def forward(self, input_ids):
        """-> [B, L], read at each row's last token that is not padding (right padding)."""
        logits = self.score(self.model(input_ids))  # [B, T, L]
        if self.config.pad_token_id is None:
            return logits[:, -1]
        not_pad = (input_ids != self.config.pad_token_id).int()
        last = (torch.arange(input_ids.shape[1], device=input_ids.device) * not_pad).argmax(-1)  # [B]
        return logits[torch.arange(len(last)), last]


class Qwen3ForTokenClassification(TaskModel):
    def __init__(self, config: Qwen3Config):
        super().__init__(config, "score", config.num_labels, bias=True)

    def forward(self, input_ids):
        return self.score(self.model(input_ids))  # [B, T, L]


class Qwen3ForQuestionAnswering(TaskModel):
    def __init__(self, config: Qwen3Config):
        super().__init__(config, "qa_outputs", 2, bias=True)

    def forward(self, input_ids):
        return self.qa_outputs(self.model(input_ids)).unbind(-1)  # start and end logits, [B, T] each


if __name__ == "__main__":
    import moe  # a script may look up the MoE presets; as a library this file imports nothing of ours

    name = sys.argv[1] if len(sys.argv) > 1 else "0.6B"
    presets = Qwen3Config.PRESETS | moe.Qwen3MoeConfig.PRESETS
    if name not in presets:
        print(f"error: unknown preset {name!r}; expected one of {', '.join(presets)}", file=sys.stderr)
        sys.exit(2)
    config = moe.Qwen3MoeConfig.from_name(name) if name in moe.Qwen3MoeConfig.PRESETS else Qwen3Config.from_name(name)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    print(f"Qwen3-{name}", json.dumps(asdict(config), indent=1))
    # Parameters per component; per token, a MoE layer runs only num_experts_per_tok of its num_experts experts.
    groups = {"embedding": "embed_tokens", "attention": "self_attn.", "router": "mlp.gate.",
              "experts": "mlp.experts.", "mlp": "mlp.", "norms": "norm", "head": ""}
    totals = dict.fromkeys(groups, 0)
    for param_name, p in model.named_parameters():  # a tied head shares the embedding and is counted once
        totals[next(g for g, key in groups.items() if key in param_name)] += p.numel()
    share = getattr(config, "num_experts_per_tok", 1) / getattr(config, "num_experts", 1)
    rows = [(g, n, round(n * share) if g == "experts" else n) for g, n in totals.items() if n]
    print(f"\n{'component':<12}{'parameters':>16}{'active/token':>16}")
    for group, total, active in rows + [("total", sum(r[1] for r in rows), sum(r[2] for r in rows))]:
        print(f"{group:<12}{total:>16,}{active:>16,}")
    if config.tie_word_embeddings:
        print("(the head is tied to the embedding: one matrix, counted once)")
