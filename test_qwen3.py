"""Tests: a NumPy (float64) twin of every layer, parity with Hugging Face transformers on random checkpoints,
loading, the tokenizer and generation.

    python -m pytest -q

Cases that need the real Qwen3 tokenizer files run when QWEN3_TOKENIZER_DIR points at them; cases that compare
with transformers run when it is installed (CI installs it). Everything else builds its own tiny fixtures.
"""
import io
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

import generate
import load_weights
import moe
import qwen3
from tokenizer import SPLIT, Qwen3Tokenizer, byte_decoder

HERE = Path(__file__).parent
REAL_TOKENIZER = os.environ.get("QWEN3_TOKENIZER_DIR")
needs_real_tokenizer = pytest.mark.skipif(not REAL_TOKENIZER, reason="QWEN3_TOKENIZER_DIR is not set")
CONFIGS_DIR = Path(REAL_TOKENIZER or ".").parent / "configs"  # ../shared/reference/configs beside the tokenizer


# ---------------------------------------------------------------- NumPy reference (float64, batch of one)

def np_rmsnorm(x, w, eps):
    return w * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def np_rope_tables(c, T):
    """cos, sin [T, D] written from the RoPE/YaRN formulas, independently of qwen3.rope_frequencies."""
    D = c.head_dim
    inv = 1.0 / c.rope_theta ** (np.arange(0, D, 2) / D)
    scale = 1.0
    if c.rope_scaling:
        s = c.rope_scaling
        factor, orig = s["factor"], s["original_max_position_embeddings"]
        dim = lambda r: D * math.log(orig / (r * 2 * math.pi)) / (2 * math.log(c.rope_theta))  # noqa: E731
        lo, hi = max(math.floor(dim(32)), 0), min(math.ceil(dim(1)), D - 1)
        ramp = np.clip((np.arange(D // 2) - lo) / ((hi - lo) or 0.001), 0, 1)  # 0: keep, 1: interpolate
        inv = inv / factor * ramp + inv * (1 - ramp)
        scale = 0.1 * math.log(factor) + 1
    ang = np.arange(T)[:, None] * inv[None]
    ang = np.concatenate([ang, ang], -1)
    return np.cos(ang) * scale, np.sin(ang) * scale


def np_rope(x, cos, sin):  # x [T, heads, D]
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, None] + rotated * sin[:, None]


def np_linear(p, name, x):
    return x @ p[name + ".weight"].T + p.get(name + ".bias", 0.0)


def np_attention(p, c, x, sliding):
    T, H, N, D = len(x), c.num_attention_heads, c.num_key_value_heads, c.head_dim
    q = np_rmsnorm(np_linear(p, "q_proj", x).reshape(T, H, D), p["q_norm.weight"], c.rms_norm_eps)
    k = np_rmsnorm(np_linear(p, "k_proj", x).reshape(T, N, D), p["k_norm.weight"], c.rms_norm_eps)
    v = np_linear(p, "v_proj", x).reshape(T, N, D)
    cos, sin = np_rope_tables(c, T)
    q, k = np_rope(q, cos, sin), np_rope(k, cos, sin)
    k, v = np.repeat(k, H // N, axis=1), np.repeat(v, H // N, axis=1)  # head h reads kv head h // (H/N)
    scores = np.einsum("thd,shd->hts", q, k) / math.sqrt(D)
    i, j = np.arange(T)[:, None], np.arange(T)[None]
    visible = (j <= i) & ((j > i - c.sliding_window) if sliding else True)
    scores = np.where(visible, scores, -np.inf)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np_linear(p, "o_proj", np.einsum("hts,shd->thd", w, v).reshape(T, H * D))


def np_mlp(p, x):
    g = np_linear(p, "gate_proj", x)
    return np_linear(p, "down_proj", g / (1 + np.exp(-g)) * np_linear(p, "up_proj", x))


def np_moe(p, c, x):
    logits = np_linear(p, "gate", x)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    I = c.moe_intermediate_size
    for t in range(len(x)):
        top = np.argsort(-probs[t])[:c.num_experts_per_tok]
        w = probs[t, top] / (probs[t, top].sum() if c.norm_topk_prob else 1.0)
        for e, we in zip(top, w):
            gate_up = p["experts.gate_up_proj"][e]  # [2I, C]: gate rows, then up rows
            expert = {"gate_proj.weight": gate_up[:I], "up_proj.weight": gate_up[I:],
                      "down_proj.weight": p["experts.down_proj"][e]}
            out[t] += we * np_mlp(expert, x[t:t + 1])[0]
    return out, logits


def sub(p, prefix):
    return {k[len(prefix) + 1:]: v for k, v in p.items() if k.startswith(prefix + ".")}


def np_layer(p, c, i, x):
    x = x + np_attention(sub(p, "self_attn"), c, np_rmsnorm(x, p["input_layernorm.weight"], c.rms_norm_eps),
                         c.is_sliding(i))
    h = np_rmsnorm(x, p["post_attention_layernorm.weight"], c.rms_norm_eps)
    sparse = "mlp.gate.weight" in p
    return x + (np_moe(sub(p, "mlp"), c, h)[0] if sparse else np_mlp(sub(p, "mlp"), h))


def np_forward(p, c, ids):
    x = p["model.embed_tokens.weight"][ids]
    for i in range(c.num_hidden_layers):
        x = np_layer(sub(p, f"model.layers.{i}"), c, i, x)
    x = np_rmsnorm(x, p["model.norm.weight"], c.rms_norm_eps)
    return x @ p["lm_head.weight"].T


# ---------------------------------------------------------------- helpers

def tiny_dense(**kw):
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=24, max_position_embeddings=256, rope_theta=10000.0)
    return qwen3.Qwen3Config(**{**base, **kw})


def tiny_moe(**kw):
    base = dict(vocab_size=128, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                max_position_embeddings=256)
    return moe.Qwen3MoeConfig(**{**base, **kw})


def random_model(config, seed=0, cls=None):
    torch.manual_seed(seed)
    model = (cls or load_weights.build_model)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # norms near 1, everything else small and random
            p.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else 0.3)
    return model


def numpy_params(module):
    return {k: v.detach().double().numpy() for k, v in module.state_dict().items()}


def close(a, b, tol=2e-5):
    """Largest difference, relative to the largest value, is below tol."""
    a, b = np.asarray(torch.as_tensor(a).double()), np.asarray(torch.as_tensor(b).double())
    assert a.shape == b.shape, (a.shape, b.shape)
    err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)
    assert err < tol, f"relative error {err:.2e} >= {tol}"


DENSE_CASES = {
    "bias-sliding-yarn-gqa2-headdim24": dict(attention_bias=True, use_sliding_window=True, sliding_window=5,
                                             max_window_layers=1, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                             "original_max_position_embeddings": 16}),
    "gqa4-tied": dict(num_key_value_heads=1, head_dim=16, tie_word_embeddings=True, rope_theta=1e6),
    "mha-untied": dict(num_key_value_heads=4, num_hidden_layers=2),
}
MOE_CASES = {
    "mixed-step2-renorm": dict(decoder_sparse_step=2, mlp_only_layers=[3], norm_topk_prob=True),
    "128experts-top8": dict(num_experts=128, num_experts_per_tok=8, num_hidden_layers=2, hidden_size=32,
                            moe_intermediate_size=8),
    "sliding-yarn-tied": dict(use_sliding_window=True, sliding_window=4, tie_word_embeddings=True,
                              rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8}),
}


def all_cases():
    return ([(n, tiny_dense(**kw)) for n, kw in DENSE_CASES.items()]
            + [(n, tiny_moe(**kw)) for n, kw in MOE_CASES.items()])


# ---------------------------------------------------------------- each layer against its NumPy twin

def test_rmsnorm_matches_numpy():
    norm = qwen3.RMSNorm(32, 1e-6)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 5, 32) * 4
    close(norm(x).detach(), np_rmsnorm(x.double().numpy(), norm.weight.detach().double().numpy(), 1e-6))


@pytest.mark.parametrize("scaling", [None, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
                                     {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096}])
def test_rope_and_yarn_match_numpy(scaling):
    c = tiny_dense(rope_scaling=scaling, head_dim=64)
    model = qwen3.Qwen3Model(c)
    T = 40
    angles = torch.arange(T)[:, None].float() * model.inv_freq
    cos, sin = np_rope_tables(c, T)
    close(torch.cat([angles, angles], -1).cos() * model.rope_factor, cos, 1e-5)
    x = torch.randn(1, 2, T, 64)
    close(qwen3.apply_rope(x, torch.tensor(cos).float(), torch.tensor(sin).float()),
          np_rope(x[0].transpose(0, 1).double().numpy(), cos, sin).transpose(1, 0, 2)[None])


@pytest.mark.parametrize("name,config", [(n, c) for n, c in all_cases() if not isinstance(c, moe.Qwen3MoeConfig)])
def test_attention_matches_numpy(name, config):
    model = random_model(config)
    x = torch.randn(1, 11, config.hidden_size)
    for i, layer in enumerate(model.model.layers):  # layer 0 attends fully; later ones slide in the first case
        c, s = rope_tables(model, 11)
        T = torch.arange(11)
        mask = (T[None] <= T[:, None]) & ((T[None] > T[:, None] - config.sliding_window) if layer.sliding else True)
        out = layer.self_attn(x, c, s, mask, None, 0)
        ref = np_attention(numpy_params(layer.self_attn), config, x[0].double().numpy(), layer.sliding)
        close(out[0].detach(), ref)


def rope_tables(model, T):
    angles = torch.arange(T)[:, None].float() * model.model.inv_freq
    angles = torch.cat([angles, angles], -1)
    return angles.cos() * model.model.rope_factor, angles.sin() * model.model.rope_factor


def test_mlp_matches_numpy():
    mlp = qwen3.MLP(16, 40)
    x = torch.randn(2, 7, 16)
    close(mlp(x).detach(), np_mlp(numpy_params(mlp), x.reshape(-1, 16).double().numpy()).reshape(2, 7, 16))


@pytest.mark.parametrize("renorm", [False, True])
def test_moe_block_matches_numpy(renorm):
    c = tiny_moe(norm_topk_prob=renorm, num_experts=16, num_experts_per_tok=4)
    block = random_model(c).model.layers[0].mlp
    x = torch.randn(1, 9, c.hidden_size)
    out = block(x)
    ref, logits = np_moe(numpy_params(block), c, x[0].double().numpy())
    close(out[0].detach(), ref)
    close(block.router_logits.detach(), logits)


@pytest.mark.parametrize("name,config", all_cases())
def test_decoder_layers_match_numpy(name, config):
    model = random_model(config)
    x = torch.randn(1, 12, config.hidden_size)
    c, s = rope_tables(model, 12)
    T = torch.arange(12)
    for i, layer in enumerate(model.model.layers):  # dense, sparse, full and sliding layers, as the case has them
        mask = (T[None] <= T[:, None]) & ((T[None] > T[:, None] - config.sliding_window) if layer.sliding else True)
        out = layer(x, c, s, mask, None, 0)
        close(out[0].detach(), np_layer(numpy_params(layer), config, i, x[0].double().numpy()))


@pytest.mark.parametrize("name,config", all_cases())
def test_full_forward_matches_numpy(name, config):
    model = random_model(config)
    ids = torch.randint(0, config.vocab_size, (1, 13))
    out = model(ids)
    close(out.detach()[0], np_forward(numpy_params(model), config, ids[0].numpy()))


@pytest.mark.parametrize("name,config", all_cases())
def test_cached_decoding_equals_full_forward(name, config):
    model = random_model(config)
    ids = torch.randint(0, config.vocab_size, (2, 14))  # longer than the sliding windows above
    full = model(ids)
    cache = qwen3.KVCache(config, 2, 14)
    steps = [model(ids[:, :5], cache, 0)] + [model(ids[:, t:t + 1], cache, t) for t in range(5, 14)]
    close(torch.cat(steps, 1).detach(), full.detach(), 1e-5)


def test_decode_computes_only_routed_experts():
    c = tiny_moe(num_experts=16, num_experts_per_tok=2)
    model = random_model(c)
    called = []
    model.model.layers[0].mlp.experts.register_forward_hook(lambda module, args, out: called.append(args[1]))
    model(torch.tensor([[3]]))
    assert len(called) == 2 and len(set(called)) == 2


# ---------------------------------------------------------------- configs and presets

def test_config_defaults_are_the_documented_ones():
    d = qwen3.Qwen3Config()
    assert (d.vocab_size, d.hidden_size, d.intermediate_size, d.num_hidden_layers, d.num_attention_heads,
            d.num_key_value_heads, d.head_dim, d.max_position_embeddings, d.rope_theta, d.rms_norm_eps) == \
        (151936, 4096, 22016, 32, 32, 32, 128, 32768, 10000.0, 1e-6)
    assert (d.attention_bias, d.use_sliding_window, d.sliding_window, d.max_window_layers, d.tie_word_embeddings) == \
        (False, False, 4096, 28, False)
    m = moe.Qwen3MoeConfig()
    assert (m.hidden_size, m.intermediate_size, m.num_hidden_layers, m.num_attention_heads, m.num_key_value_heads,
            m.num_experts, m.num_experts_per_tok, m.moe_intermediate_size, m.decoder_sparse_step, m.mlp_only_layers,
            m.norm_topk_prob, m.router_aux_loss_coef) == (2048, 6144, 24, 32, 4, 128, 8, 768, 1, [], False, 0.001)


def test_from_hf_reads_both_formats_and_ignores_unknown_keys():
    hub = {"hidden_size": 64, "rope_theta": 1000000, "rope_scaling": {"type": "yarn", "factor": 4.0,
           "original_max_position_embeddings": 32768}, "num_experts": 16, "torch_dtype": "bfloat16", "foo": 1}
    v5 = {"hidden_size": 64, "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "yarn", "factor": 4.0,
          "original_max_position_embeddings": 32768}, "num_local_experts": 16, "dtype": "bfloat16", "bar": [1]}
    a, b = moe.Qwen3MoeConfig.from_hf(hub), moe.Qwen3MoeConfig.from_hf(v5)
    assert a == b and a.num_experts == 16 and a.rope_theta == 1e6 and a.rope_scaling["rope_type"] == "yarn"
    plain = qwen3.Qwen3Config.from_hf({"rope_parameters": {"rope_theta": 5.0, "rope_type": "default"}})
    assert plain.rope_theta == 5.0 and plain.rope_scaling is None
    with pytest.raises(ValueError, match="unknown preset"):
        qwen3.Qwen3Config.from_name("7B")


needs_configs = pytest.mark.skipif(not (CONFIGS_DIR / "Qwen3-0.6B.json").exists(), reason="reference configs absent")


@needs_configs
@pytest.mark.parametrize("name", [*qwen3.Qwen3Config.PRESETS, *moe.Qwen3MoeConfig.PRESETS])
def test_presets_are_the_released_models(name):
    transformers = pytest.importorskip("transformers")
    released = json.loads((CONFIGS_DIR / f"Qwen3-{name}.json").read_text())
    cls = moe.Qwen3MoeConfig if name in moe.Qwen3MoeConfig.PRESETS else qwen3.Qwen3Config
    assert cls.from_name(name) == cls.from_hf(released)
    with torch.device("meta"):
        ours = sum(p.numel() for p in load_weights.build_model(cls.from_name(name)).parameters())
        hf_config = transformers.AutoConfig.for_model(**released)
        theirs = transformers.AutoModelForCausalLM.from_config(hf_config).num_parameters()
    assert ours == theirs


def test_parameter_table_script():
    out = subprocess.run([sys.executable, "qwen3.py", "30B-A3B"], cwd=HERE, capture_output=True, text=True,
                         check=True).stdout
    total, active = [int(x.replace(",", "")) for x in out.splitlines()[-1].split()[1:]]
    assert round(total / 1e9, 1) == 30.5 and 3.3e9 <= active < 3.4e9  # published: 30.5B total, 3.3B active
    assert "experts" in out and "router" in out and "attention" in out


# ---------------------------------------------------------------- parity with transformers

def hf_config(config, arch):
    """Our config as a transformers config for architecture arch."""
    import transformers
    d = {k: v for k, v in asdict(config).items() if v is not None}
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": d.pop("rope_theta"), **(d.pop("rope_scaling", {}))}
    cls = transformers.Qwen3MoeConfig if "Moe" in arch else transformers.Qwen3Config
    return cls(**d, architectures=[arch])


def to_hub_format(folder):
    """Rewrite a transformers-5 config.json the way the hub serves Qwen3 configs (written by transformers 4.51)."""
    path = Path(folder) / "config.json"
    d = json.loads(path.read_text())
    rope = d.pop("rope_parameters")
    d["rope_theta"] = rope.pop("rope_theta")
    d["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    if "num_local_experts" in d:
        d["num_experts"] = d.pop("num_local_experts")
    d["torch_dtype"] = d.pop("dtype")
    d.pop("layer_types", None)
    path.write_text(json.dumps(d))


def save_hf(config, arch, folder, fmt="v5", dtype=torch.float32, seed=0, **save_kw):
    """A random checkpoint written by transformers; returns the transformers model (eager attention, float32)."""
    import transformers
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(hf_config(config, arch)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else 0.3)
    model.to(dtype).save_pretrained(folder, **save_kw)
    if fmt == "hub":
        to_hub_format(folder)
    return getattr(transformers, arch).from_pretrained(folder, attn_implementation="eager",
                                                       dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.mark.parametrize("fmt", ["v5", "hub"])
@pytest.mark.parametrize("name,config", all_cases())
def test_causal_lm_matches_transformers(transformers, tmp_path, name, config, fmt):
    is_moe = isinstance(config, moe.Qwen3MoeConfig)
    hf = save_hf(config, "Qwen3MoeForCausalLM" if is_moe else "Qwen3ForCausalLM", tmp_path, fmt)
    ours = load_weights.load_model(tmp_path)
    assert ours.config == config
    ids = torch.randint(0, config.vocab_size, (2, 17))
    with torch.no_grad():
        ref = hf(ids, output_router_logits=True) if is_moe else hf(ids)
        out = ours(ids, output_router_logits=True) if is_moe else ours(ids)
    close((out[0] if is_moe else out), ref.logits)
    if is_moe:
        assert len(out[1]) == len(ref.router_logits) == sum(isinstance(layer.mlp, moe.SparseMoE)
                                                              for layer in ours.model.layers)
        for a, b in zip(out[1], ref.router_logits):
            close(a, b)
        close(moe.load_balancing_loss(out[1], config.num_experts, config.num_experts_per_tok), ref.aux_loss)
        mask = torch.ones_like(ids)
        mask[0, 11:] = 0  # right padding: the padded tokens must not count
        with torch.no_grad():
            ref = hf(ids, attention_mask=mask, output_router_logits=True)
        close(moe.load_balancing_loss(out[1], config.num_experts, config.num_experts_per_tok, mask), ref.aux_loss)


HEAD_CASES = [(backbone, head) for backbone in ("Qwen3", "Qwen3Moe")
              for head in ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")]


@pytest.mark.parametrize("backbone,head", HEAD_CASES)
def test_heads_match_transformers(transformers, tmp_path, backbone, head):
    config = replace(tiny_moe(decoder_sparse_step=2) if backbone == "Qwen3Moe" else tiny_dense(), num_labels=3,
                     pad_token_id=0)
    hf = save_hf(config, backbone + head, tmp_path, fmt="hub" if backbone == "Qwen3" else "v5")
    ours = load_weights.load_model(tmp_path)
    ids = torch.randint(1, config.vocab_size, (3, 10))
    ids[1, 6:] = 0  # right padding: sequence classification pools at token 5 in this row
    ids[2, 9:] = 0
    with torch.no_grad():
        ref, out = hf(ids), ours(ids)
    if head == "ForQuestionAnswering":
        close(out[0], ref.start_logits)
        close(out[1], ref.end_logits)
    else:
        assert out.shape == ref.logits.shape == ((3, 3) if head == "ForSequenceClassification" else (3, 10, 3))
        close(out, ref.logits)


# ---------------------------------------------------------------- loading real layouts

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_checkpoints_load(transformers, tmp_path, dtype):
    config = tiny_moe()
    hf = save_hf(config, "Qwen3MoeForCausalLM", tmp_path, dtype=dtype, max_shard_size="60KB")
    assert len(set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values())) > 2
    kept = load_weights.load_model(tmp_path)  # dtype=None keeps the file's
    assert kept.lm_head.weight.dtype == dtype
    ours = load_weights.load_model(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, config.vocab_size, (1, 9))
    with torch.no_grad():
        close(ours(ids), hf(ids).logits)
        if dtype == torch.bfloat16:
            close(kept(ids).float(), hf(ids).logits, 0.1)


def test_moe_checkpoint_missing_or_misshapen_expert(transformers, tmp_path):
    save_hf(tiny_moe(), "Qwen3MoeForCausalLM", tmp_path)
    from safetensors.torch import load_file, save_file
    state = load_file(tmp_path / "model.safetensors")
    key = "model.layers.2.mlp.experts.5.up_proj.weight"
    save_file({k: v for k, v in state.items() if k != key}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_weights.load_model(tmp_path)
    save_file({**state, key: state[key][:-1]}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"up_proj.weight has shape \(23, 48\), the config asks for \(24, 48\)"):
        load_weights.load_model(tmp_path)


def test_tied_checkpoint_has_no_lm_head_and_stays_tied(transformers, tmp_path):
    save_hf(tiny_dense(tie_word_embeddings=True), "Qwen3ForCausalLM", tmp_path)
    from safetensors import safe_open
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    model = load_weights.load_model(tmp_path, dtype=torch.float16)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.float16


def write_checkpoint(model, folder):
    """A dense checkpoint written without transformers: our state dict, our config as config.json."""
    from safetensors.torch import save_file
    Path(folder).mkdir(exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, Path(folder) / "model.safetensors")
    config = {**asdict(model.config), "architectures": ["Qwen3ForCausalLM"]}
    (Path(folder) / "config.json").write_text(json.dumps(config))
    return state


@pytest.fixture
def good_checkpoint(tmp_path):
    model = random_model(tiny_dense(num_hidden_layers=2))
    return tmp_path / "ckpt", write_checkpoint(model, tmp_path / "ckpt"), model


def test_loads_a_checkpoint_written_without_transformers(good_checkpoint):
    folder, _, model = good_checkpoint
    ids = torch.randint(0, 128, (1, 6))
    close(load_weights.load_model(folder)(ids).detach(), model(ids).detach(), 1e-6)


def broken(folder, state, case):
    from safetensors.torch import save_file
    config = folder / "config.json"
    if case == "missing folder":
        return folder / "nope", "nope"
    if case == "missing config":
        config.unlink()
        return folder, "config.json"
    if case == "invalid config":
        config.write_text("{not json")
        return folder, "config.json"
    if case == "not qwen3":
        config.write_text(json.dumps({**json.loads(config.read_text()), "architectures": ["LlamaForCausalLM"]}))
        return folder, "LlamaForCausalLM"
    if case == "bad config value":
        config.write_text(json.dumps({**json.loads(config.read_text()), "hidden_size": "wide"}))
        return folder, "config.json"
    if case == "negative size":
        config.write_text(json.dumps({**json.loads(config.read_text()), "intermediate_size": -4}))
        return folder, "config.json"
    if case == "config is a list":
        config.write_text("[1, 2]")
        return folder, "config.json"
    (folder / "model.safetensors").unlink()
    if case == "no weights":
        return folder, "model.safetensors"
    if case == "pickles only":
        (folder / "pytorch_model.bin").write_bytes(b"not loaded")
        return folder, "pytorch_model.bin"
    if case == "truncated":
        save_file(state, folder / "model.safetensors")
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
        return folder, "model.safetensors"
    if case == "garbage":
        (folder / "model.safetensors").write_bytes(b"\xff" * 64)
        return folder, "model.safetensors"
    if case == "wrong shape":
        save_file({**state, "model.norm.weight": torch.ones(3)}, folder / "model.safetensors")
        return folder, "model.norm.weight"
    if case == "missing tensor":
        save_file({k: v for k, v in state.items() if "layers.1.mlp.up_proj" not in k}, folder / "model.safetensors")
        return folder, "model.layers.1.mlp.up_proj.weight"
    if case == "unexpected tensor":
        save_file({**state, "model.extra.weight": torch.ones(2)}, folder / "model.safetensors")
        return folder, "model.extra.weight"
    if case == "missing shard":
        save_file(state, folder / "a.safetensors")
        index = {"weight_map": {k: ("a.safetensors" if i else "b.safetensors") for i, k in enumerate(state)}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        return folder, "b.safetensors"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing folder", "missing config", "invalid config", "not qwen3", "bad config value",
                                  "negative size", "config is a list",
                                  "no weights", "pickles only", "truncated", "garbage", "wrong shape",
                                  "missing tensor", "unexpected tensor", "missing shard"])
def test_broken_checkpoints_are_refused_with_a_message(good_checkpoint, case):
    folder, state, _ = good_checkpoint
    path, named = broken(folder, state, case)
    with pytest.raises((FileNotFoundError, ValueError)) as e:
        load_weights.load_model(path)
    assert type(e.value) in (FileNotFoundError, ValueError) and named in str(e.value)


def test_pickles_are_never_opened(good_checkpoint, monkeypatch):
    folder, state, _ = good_checkpoint
    broken(folder, state, "pickles only")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(ValueError, match="Convert"):
        load_weights.load_model(folder)


def test_too_large_for_memory_is_refused_before_loading(good_checkpoint, monkeypatch):
    folder, _, _ = good_checkpoint
    monkeypatch.setattr(load_weights, "free_memory", lambda device: 1000)
    monkeypatch.setattr(load_weights, "safe_open", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(ValueError, match=r"need 0\.\d+ GiB in float32 .* only 0\.00 GiB"):
        load_weights.load_model(folder, dtype=torch.float32)


MEMORY_PROBE = """
import resource, sys, torch, load_weights
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = load_weights.load_model(sys.argv[1])
with torch.inference_mode():
    model(torch.arange(16)[None])
added = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(added / weights, model.lm_head.weight.dtype)
"""


def test_loading_adds_little_memory(tmp_path):
    """A bf16 checkpoint of Qwen3-0.6B's size: loading and a first forward pass add <= 1.3x the weights' size."""
    config = qwen3.Qwen3Config.from_name("0.6B")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in load_weights.build_model(config).state_dict().items()}
    from safetensors.torch import save_file
    save_file({k: torch.full(s, 0.01, dtype=torch.bfloat16) for k, s in shapes.items() if k != "lm_head.weight"},
              tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({**asdict(config), "architectures": ["Qwen3ForCausalLM"]}))
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path)], cwd=HERE, capture_output=True,
                         text=True, check=True).stdout.split()
    assert float(out[0]) <= 1.3 and out[1] == "torch.bfloat16"


def test_free_memory_is_a_real_number():
    free = load_weights.free_memory(torch.device("cpu"))
    assert free is None or 2**20 < free < 2**50


# ---------------------------------------------------------------- tokenizer

FIXTURE_ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<think>", False),
                 ("</think>", False)]


def write_fixture_tokenizer(folder):
    """A byte-level BPE tokenizer.json with five merges and Qwen's added tokens, ids below 272."""
    to_char = {b: c for c, b in byte_decoder().items()}
    vocab = {to_char[b]: b for b in range(256)}
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), (to_char[32], "w")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    added = [{"id": len(vocab) + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": s} for i, (t, s) in enumerate(FIXTURE_ADDED)]
    data = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": {"type": "NFC"},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": SPLIT}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]}}
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "tokenizer.json").write_text(json.dumps(data))
    (Path(folder) / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                                    "pad_token": "<|endoftext|>"}))


@pytest.fixture(scope="module")
def fixture_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    write_fixture_tokenizer(folder)
    return Qwen3Tokenizer(folder)


def test_fixture_tokenizer_merges_added_tokens_and_nfc(fixture_tokenizer):
    t = fixture_tokenizer
    assert t.encode("hello") == [259]
    assert t.encode(" w") == [260]
    assert t.encode("hello<|im_end|>x") == [259, 263, ord("x")]
    assert t.encode("<|im_end") == list(b"<|im_end")  # a near miss is plain text
    assert t.encode("e\u0301") == list("é".encode())  # NFC composes e + combining acute
    assert (t.eos_token_id, t.pad_token_id, t.stop_ids) == (263, 261, (263, 261))


def test_tokenizer_needs_its_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        Qwen3Tokenizer(tmp_path)


def test_fixture_tokenizer_decodes(fixture_tokenizer):
    t = fixture_tokenizer
    text = "hello wörld 🙂 <think>x</think><|im_end|>"
    assert t.decode(t.encode(text)) == text
    assert t.decode(t.encode(text), skip_special_tokens=True) == "hello wörld 🙂 <think>x</think>"
    assert t.decode([0xF0, 0x9F]) == "\ufffd"  # half an emoji
    assert t.decode([259, 5000]) == "hello"  # ids past the vocabulary decode to nothing


def test_stream_decoder_holds_partial_characters(fixture_tokenizer):
    t = fixture_tokenizer
    ids = t.encode("a🙂b") + [0xFF, 0xE4] + t.encode("中")
    step = t.stream()
    pieces = [step(i) for i in ids] + [step(None)]
    assert pieces[:6] == ["a", "", "", "", "🙂", "b"]
    assert "".join(pieces) == t.decode(ids)


def test_fixture_tokenizer_matches_tokenizers_library(fixture_tokenizer, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    write_fixture_tokenizer(tmp_path)
    ref = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in ["hello world", "he said 'hello'\n\n  x", "e\u0301<think>hello</think>", "<|im_start|>user\nhi"]:
        assert fixture_tokenizer.encode(text) == ref.encode(text).ids


def test_chat_template_by_hand(fixture_tokenizer):
    t = fixture_tokenizer
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "<think>\nplan\n</think>\n\nA1"}, {"role": "user", "content": "Q2"}]
    expected = ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n"
                "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n")
    assert t.apply_chat_template(messages) == expected
    assert t.apply_chat_template(messages, enable_thinking=False) == expected + "<think>\n\n</think>\n\n"
    last = messages[:2] + [{"role": "assistant", "content": "<think>plan</think>A1"}]
    assert t.apply_chat_template(last, add_generation_prompt=False).endswith(
        "<|im_start|>assistant\n<think>\nplan\n</think>\n\nA1<|im_end|>\n")
    with pytest.raises(ValueError, match="tool"):
        t.apply_chat_template([{"role": "tool", "content": "x"}])


PARITY_TEXTS = [
    "Hello, world! How are you doing today?", "你好，世界！今天天气很好。我们去公园散步吧。", "こんにちは、世界。カタカナとひらがな。",
    "안녕하세요, 세계!", "مرحبا بالعالم، كيف حالك؟", "Привет, мир! Как дела?", "👨‍👩‍👧‍👦 🏳️‍🌈 👍🏽 🇯🇵🇫🇷 😀😃",
    "cafe\u0301 re\u0301sume\u0301 A\u030a n\u0303", "ＡＢＣ１２３！？　全角", "1234567890 3.14159 1e-10 2,000,000",
    "   leading  and trailing   \n\n\n\nnewlines\t\ttabs \r\n crlf\r\r\n", "def f(x):\n    return x ** 2  # square\n",
    "https://example.com/a/b?q=1&lang=en#frag user@example.org", "∑_{i=1}^{n} i² = n(n+1)(2n+1)/6, ∫ e^{-x²} dx = √π",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\nok\n</think>\n\nYes<|im_end|>",
    "<|im_start <|im_end| <think <|endoftext|x </think>>", "I'm sure you'LL see we've THEY'RE", "a<|im_end|>\u0338b",
    "", " ", "\n", "x" * 300, "ſ ß ẞ ﬁ ﬂ Ǆ ǅ", "\u200b\u200d\ufeff zero width", "Ⅻ ① ⁴ ½",
]


@needs_real_tokenizer
def test_real_tokenizer_matches_tokenizers_library():
    tokenizers = pytest.importorskip("tokenizers")
    ours = Qwen3Tokenizer(REAL_TOKENIZER)
    ref = tokenizers.Tokenizer.from_file(str(Path(REAL_TOKENIZER) / "tokenizer.json"))
    for text in PARITY_TEXTS:
        ids = ref.encode(text).ids
        assert ours.encode(text) == ids, text
        for skip in (False, True):
            assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip)
    rng = np.random.default_rng(0)
    for _ in range(3000):  # short id runs, often not valid UTF-8 alone, some special
        ids = rng.integers(0, 151669, rng.integers(1, 5)).tolist()
        for skip in (False, True):
            assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip), ids
        step = ours.stream()
        assert "".join(step(i) for i in ids) + step(None) == ours.decode(ids)
    assert ours.eos_token_id == 151645 and ours.pad_token_id == 151643 and set(ours.stop_ids) == {151645, 151643}


CONVERSATIONS = [
    [{"role": "user", "content": "Give me a short introduction to large language models."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}, {"role": "user", "content": "and 3+3?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "<think>x</think>\n\nd"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "r"},
     {"role": "system", "content": "late system"}, {"role": "user", "content": "<tool_response>x</tool_response>"},
     {"role": "assistant", "content": "\n\nfinal", "reasoning_content": "why"}],
]


@needs_real_tokenizer
def test_chat_template_matches_transformers(transformers):
    ref = transformers.AutoTokenizer.from_pretrained(REAL_TOKENIZER)
    ours = Qwen3Tokenizer(REAL_TOKENIZER)
    for messages in CONVERSATIONS:
        for think in (True, False):
            for gen in (True, False):
                assert ours.apply_chat_template(messages, gen, think) == ref.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=gen, enable_thinking=think)


# ---------------------------------------------------------------- sampling and generation

def test_sampling_functions():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    assert generate.sample(logits) == 1
    assert torch.isinf(generate.apply_top_k(logits, 2)).tolist() == [True, False, False, True]
    p = logits.softmax(-1)  # [0.087, 0.644, 0.237, 0.032]
    assert torch.isinf(generate.apply_top_p(logits, 0.6)).tolist() == [True, False, True, True]
    assert torch.isinf(generate.apply_top_p(logits, float(p[1] + p[2]) + 0.01)).tolist() == [False, False, False, True]
    draws = [generate.sample(logits, 5.0, 3, 0.99, torch.Generator().manual_seed(s)) for s in range(200)]
    assert set(draws) == {0, 1, 2}  # top-k 3 drops token 3; a high temperature reaches all the others
    again = [generate.sample(logits, 5.0, 3, 0.99, torch.Generator().manual_seed(s)) for s in range(200)]
    assert draws == again


def greedy_case(transformers, tmp_path, config, arch, prompt_len, new):
    hf = save_hf(config, arch, tmp_path)
    ours = load_weights.load_model(tmp_path)
    ids = torch.randint(0, config.vocab_size, (1, prompt_len))
    ref = hf.generate(ids, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)[0, prompt_len:]
    assert list(generate.generate(ours, ids[0], new)) == ref.tolist()


def test_greedy_equals_transformers_dense_real_vocab(transformers, tmp_path):
    greedy_case(transformers, tmp_path, tiny_dense(vocab_size=151936, hidden_size=32, head_dim=16,
                                                   intermediate_size=64), "Qwen3ForCausalLM", 7, 24)


def test_greedy_equals_transformers_sliding_window(transformers, tmp_path):
    config = tiny_dense(use_sliding_window=True, sliding_window=4, max_window_layers=1)
    greedy_case(transformers, tmp_path, config, "Qwen3ForCausalLM", 6, 20)


def test_greedy_equals_transformers_moe(transformers, tmp_path):
    greedy_case(transformers, tmp_path, tiny_moe(decoder_sparse_step=2), "Qwen3MoeForCausalLM", 5, 20)


def test_generate_stops_after_a_stop_id(tmp_path):
    model = random_model(tiny_dense())
    first = list(generate.generate(model, [1, 2, 3], 10))
    assert list(generate.generate(model, [1, 2, 3], 10, stop_ids={first[2]})) == first[:first.index(first[2]) + 1]
    a = list(generate.generate(model, [1, 2, 3], 15, temperature=1.5, seed=1))
    assert a == list(generate.generate(model, [1, 2, 3], 15, temperature=1.5, seed=1))
    assert a != list(generate.generate(model, [1, 2, 3], 15, temperature=1.5, seed=2))


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory, transformers):
    """A tiny transformers checkpoint with the fixture tokenizer (or the real one when available)."""
    folder = tmp_path_factory.mktemp("cli")
    vocab = 151936 if REAL_TOKENIZER else 272
    config = tiny_moe(vocab_size=vocab, hidden_size=32, moe_intermediate_size=16, decoder_sparse_step=2)
    hf = save_hf(config, "Qwen3MoeForCausalLM", folder)
    if REAL_TOKENIZER:
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            shutil.copy(Path(REAL_TOKENIZER) / name, folder)
    else:
        write_fixture_tokenizer(folder)
    return folder, hf


def cli(*args, stdin=""):
    return subprocess.run([sys.executable, str(HERE / "generate.py"), *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("chat", [False, True])
def test_cli_prints_what_transformers_generates(cli_checkpoint, chat):
    folder, hf = cli_checkpoint
    tok = Qwen3Tokenizer(folder)
    prompt = "hello world, tell me a story"
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], enable_thinking=False) if chat else prompt
    ids = torch.tensor([tok.encode(text)])
    out = hf.generate(ids, do_sample=False, max_new_tokens=16, eos_token_id=list(tok.stop_ids), pad_token_id=0)
    expected = tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    args = ["--no-think"] if chat else ["--no-chat"]
    run = cli(prompt, "--model", folder, "--max-new-tokens", 16, "--temperature", 0, *args)
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected + "\n"
    assert "prefill" in run.stderr and "decode" in run.stderr and "peak memory" in run.stderr


def test_cli_seeds_routing_and_chat_loop(cli_checkpoint):
    folder, _ = cli_checkpoint
    runs = [cli("hello", "--model", folder, "--max-new-tokens", 24, "--temperature", 1.5, "--top-k", 50,
                "--seed", s, "--no-chat").stdout for s in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]
    run = cli("--model", folder, "--max-new-tokens", 4, "--routing", stdin="hello\nworld\n")
    assert run.returncode == 0 and run.stderr.count("prompt ") == 2
    assert "layer   1 " in run.stderr and "layer   0 " not in run.stderr  # only layer 1 is sparse


@pytest.mark.parametrize("args,named", [
    (["--model", "./no/such/folder"], "no such folder"),
    (["--temperature", "-1"], "temperature"), (["--top-p", "0"], "top-p"), (["--top-p", "1.5"], "top-p"),
    (["--max-new-tokens", "0"], "max-new-tokens"), (["--max-new-tokens", "ten"], "max-new-tokens"),
    (["--top-k", "-3"], "top-k"), (["--dtype", "float8"], "dtype"), (["--device", "tpu"], "tpu"),
    (["--device", "cuda:7"], "cuda:7"), (["--seed", "x"], "seed"),
])
def test_cli_bad_input_is_one_line_and_exit_2(cli_checkpoint, capsys, args, named):
    folder, _ = cli_checkpoint
    with pytest.raises(SystemExit) as e:
        generate.main(["hi", "--model", str(folder), *args] if "--model" not in args else ["hi", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and named in err


def test_cli_prompt_longer_than_context_and_missing_repo(cli_checkpoint, capsys, monkeypatch):
    folder, _ = cli_checkpoint
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for argv, named in ((["hello " * 300, "--model", str(folder), "--no-chat"], "context"),
                        (["hi", "--model", "nobody/no-such-model"], "download it yourself")):
        with pytest.raises(SystemExit) as e:
            generate.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and named in err


def test_cli_ctrl_c_prints_stats_and_exits_130(cli_checkpoint, capsys, monkeypatch):
    folder, _ = cli_checkpoint

    def interrupted(*a, **k):
        yield 5
        raise KeyboardInterrupt
    monkeypatch.setattr(generate, "generate", interrupted)
    with pytest.raises(SystemExit) as e:
        generate.main(["hi", "--model", str(folder)])
    assert e.value.code == 130 and "1 new tokens" in capsys.readouterr().err


def test_cli_real_ctrl_c(tmp_path):
    """SIGINT in the middle of a long generation: the text so far, the stats line, exit status 130."""
    import signal
    write_checkpoint(random_model(tiny_dense(vocab_size=272, max_position_embeddings=8192, num_hidden_layers=1)),
                     tmp_path)
    write_fixture_tokenizer(tmp_path)
    proc = subprocess.Popen([sys.executable, str(HERE / "generate.py"), "hello", "--model", str(tmp_path),
                             "--no-chat", "--temperature", "1", "--seed", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.read(1)  # generation has started
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and first and "new tokens" in err and "Traceback" not in err


def test_benchmark_on_a_preset_slice(capsys):
    generate.main(["--benchmark", "--model", "0.6B", "--layers", "1", "--prompt-tokens", "8",
                   "--max-new-tokens", "3"])
    err = capsys.readouterr().err
    assert "prompt 8 tokens, 3 new tokens" in err and "decode" in err


def test_readme_commands_exist():
    readme = (HERE / "README.md").read_text()
    assert "python -m pytest" in readme and "python generate.py" in readme
    assert io.StringIO(readme).read().count("```") % 2 == 0
