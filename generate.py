"""Generate text with Qwen3 from the terminal: KV cache, sampling, chat template, thinking on or off.

    python generate.py "Give me a short introduction to large language models."
"""
import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

from load_weights import build_model, check_fits, load_model
from moe import Qwen3MoeConfig, SparseMoE
from qwen3 import KVCache, Qwen3Config
from tokenizer import Qwen3Tokenizer


def apply_top_k(logits, k: int):
    """Keep the k largest logits [V]; the rest become -inf."""
    return logits.masked_fill(logits < logits.topk(min(k, len(logits))).values[-1], float("-inf"))


def apply_top_p(logits, p: float):
    """Keep the smallest set of most likely tokens whose probabilities add up to at least p (nucleus)."""
    sorted_logits, order = logits.sort(descending=True)
    before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)  # mass of the tokens ahead
    return logits.masked_fill(torch.zeros_like(logits, dtype=torch.bool).scatter(0, order, before >= p), float("-inf"))


def sample(logits, temperature=0.0, top_k=None, top_p=None, generator=None) -> int:
    """One token id from logits [V]: argmax at temperature 0; else temperature, then top-k, then top-p."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k:
        logits = apply_top_k(logits, top_k)
    if top_p is not None and top_p < 1:
        logits = apply_top_p(logits, top_p)
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


@torch.inference_mode()
def generate(model, input_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, stop_ids=(), seed=None):
    """Yield new token ids: one forward pass over the prompt, then one single-token pass per new token."""
    weight = model.lm_head.weight
    ids = torch.as_tensor(input_ids, device=weight.device).view(1, -1)  # [1, T]
    cache = KVCache(model.config, 1, ids.shape[1] + max_new_tokens, weight.device)
    generator = None if seed is None else torch.Generator(weight.device).manual_seed(seed)
    logits, pos = model(ids, cache, 0, last_only=True), ids.shape[1]
    for step in range(max_new_tokens):
        token = sample(logits[0, -1], temperature, top_k, top_p, generator)
        yield token
        if token in stop_ids or step == max_new_tokens - 1:
            return
        logits = model(torch.tensor([[token]], device=weight.device), cache, pos, last_only=True)
        pos += 1


class Routing:
    """Counts how often each expert of each sparse layer was chosen; record() after every forward pass."""

    def __init__(self, model):
        self.layers = {i: layer.mlp for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, SparseMoE)}
        self.counts = {i: torch.zeros(moe.num_experts, dtype=torch.long) for i, moe in self.layers.items()}

    def record(self):
        for i, moe in self.layers.items():
            chosen = moe.router_logits.topk(moe.top_k, dim=-1).indices.flatten().cpu()  # [M*K]
            self.counts[i] += torch.bincount(chosen, minlength=moe.num_experts)

    def __str__(self):
        bars, lines = " ▁▂▃▄▅▆▇█", ["expert choices per sparse layer (a column per expert, █ = most chosen):"]
        for i, c in self.counts.items():
            level = (c * 8 + c.max() - 1) // c.max().clamp(min=1)  # rounded up, so every chosen expert shows
            top = ", ".join(f"e{e}×{int(c[e])}" for e in c.argsort(descending=True)[:3])
            lines.append(f"layer {i:>3} {''.join(bars[int(v)] for v in level)}  top: {top}")
        return "\n".join(lines)


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def checked(kind, ok, expected: str):
    """An argparse type: text -> kind, refused unless ok(value)."""
    def parse(text):
        try:
            if ok(value := kind(text)):
                return value
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"{text!r} is not {expected}")
    return parse


def parse_args(argv):
    count = checked(int, lambda v: v > 0, "a whole number above 0")
    p = argparse.ArgumentParser(description="Run Qwen3 on a prompt, or chat when no prompt is given.")
    p.add_argument("prompt", nargs="?", help="the prompt; without it, an interactive chat that ends at EOF")
    p.add_argument("--model", default="Qwen/Qwen3-0.6B", help="checkpoint folder, hub repo id, or (--benchmark) "
                   "a preset such as 8B or 30B-A3B")
    p.add_argument("--max-new-tokens", type=count, help="default 2048 (64 with --benchmark)")
    p.add_argument("--temperature", type=checked(float, lambda v: v >= 0, "a number >= 0"), help="0 = greedy")
    p.add_argument("--top-k", type=count)
    p.add_argument("--top-p", type=checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]"))
    p.add_argument("--seed", type=int, help="makes sampling reproducible")
    p.add_argument("--no-chat", action="store_true", help="feed the raw prompt, without the chat template")
    p.add_argument("--no-think", action="store_true", help="switch thinking off")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps; default: the best available")
    p.add_argument("--routing", action="store_true", help="MoE: print which experts were chosen")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, maybe faster)")
    p.add_argument("--benchmark", action="store_true", help="time prefill and decode of random tokens")
    p.add_argument("--prompt-tokens", type=count, default=512, help="prompt length with --benchmark")
    p.add_argument("--layers", type=count, help="--benchmark of a preset: keep only this many layers")
    p.error = fail  # one line and exit status 2 instead of usage text
    return p.parse_args(argv)


def pick_device(name):
    name = name or ("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError) as e:
        fail(f"--device {name}: not usable here ({str(e).splitlines()[0]})")
    return torch.device(name)


def checkpoint_folder(name: str) -> Path:
    """A local folder as is; otherwise a hub repo id, fetched once into the standard Hugging Face cache."""
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        fail(f"--model {name}: no such folder (expected a checkpoint folder or a hub repo id like Qwen/Qwen3-0.6B)")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "merges.txt"]))
    except Exception as e:  # offline, unknown repo, gated repo: all end the same way for the user
        fail(f"cannot fetch {name} from the Hugging Face hub ({type(e).__name__}); download it yourself "
             "(huggingface-cli download) or pass a local folder with --model")


def random_model(name: str, layers, dtype, device):
    """A preset of the real size with random weights, to time a model before downloading it."""
    config = Qwen3MoeConfig.from_name(name) if name in Qwen3MoeConfig.PRESETS else Qwen3Config.from_name(name)
    config.num_hidden_layers = layers or config.num_hidden_layers
    with torch.device("meta"):
        numel = sum(p.numel() for p in build_model(config).parameters())
    check_fits(numel * dtype.itemsize, device, str(dtype).replace("torch.", ""))
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built directly in dtype: no float32 copy inflates the peak memory
    with torch.device(device):
        model = build_model(config).eval()
    torch.set_default_dtype(default)
    return model


def run(model, ids, args, max_new_tokens, stop_ids=(), print_text=None, routing=None) -> list[int]:
    """Generate from ids, streaming text through print_text, then one stats line to stderr."""
    start, first, new, interrupted = time.perf_counter(), None, [], False
    try:
        for token in generate(model, ids, max_new_tokens, args.temperature, args.top_k, args.top_p, stop_ids,
                              args.seed):
            first = first or time.perf_counter()
            new.append(token)
            if routing:
                routing.record()
            if print_text:
                print(print_text(token), end="", flush=True)
    except KeyboardInterrupt:
        interrupted = True
    end = time.perf_counter()
    if print_text:
        print(print_text(None), flush=True)
    first, device = first or end, model.lm_head.weight.device
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # ru_maxrss is in kB on Linux
    print(f"prompt {len(ids)} tokens, {len(new)} new tokens, prefill {len(ids) / (first - start):.1f} tok/s, "
          f"decode {max(len(new) - 1, 0) / max(end - first, 1e-9):.1f} tok/s, peak memory {peak / 2**30:.2f} GiB",
          file=sys.stderr)
    if interrupted:
        sys.exit(130)
    return new


def typed_lines():
    """Lines typed after a "> " prompt (on stderr, so stdout stays the model's text), until EOF."""
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        if not (line := sys.stdin.readline()):
            return
        yield line.rstrip("\n")


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        if args.benchmark and args.model in Qwen3Config.PRESETS | Qwen3MoeConfig.PRESETS:
            model = random_model(args.model, args.layers, dtype or torch.bfloat16, device)
        else:
            folder = checkpoint_folder(args.model)
            model = load_model(folder, dtype, device)
            tokenizer = None if args.benchmark else Qwen3Tokenizer(folder)
            config_file = folder / "generation_config.json"
            generation = json.loads(config_file.read_text()) if config_file.exists() else {}
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if not hasattr(model, "lm_head"):
        fail(f"--model {args.model}: generation needs a causal LM, not {type(model).__name__}")
    if args.compile:
        model.forward = torch.compile(model.forward, dynamic=True)
    context = model.config.max_position_embeddings
    if args.benchmark:
        args.temperature = 0.0
        ids = torch.randint(0, model.config.vocab_size, (args.prompt_tokens,)).tolist()
        run(model, ids, args, args.max_new_tokens or 64)
        return
    # Unset sampling flags take the checkpoint's defaults; without do_sample it is greedy, as in transformers.
    defaults = generation if generation.get("do_sample") else {"temperature": 0.0}
    for flag in ("temperature", "top_k", "top_p"):
        if getattr(args, flag) is None:
            setattr(args, flag, defaults.get(flag, 1.0 if flag == "temperature" else None))
    eos = generation.get("eos_token_id") or []
    stop_ids = set(tokenizer.stop_ids) | set(eos if isinstance(eos, list) else [eos])
    routing = Routing(model) if args.routing else None
    if routing and not routing.layers:
        fail(f"--routing: {args.model} has no MoE layers")
    messages = []
    for text in [args.prompt] if args.prompt is not None else typed_lines():
        messages.append({"role": "user", "content": text})
        ids = tokenizer.encode(text if args.no_chat else
                               tokenizer.apply_chat_template(messages, enable_thinking=not args.no_think))
        if len(ids) >= context:
            fail(f"the prompt has {len(ids)} tokens; the model's context is {context}")
        new = run(model, ids, args, min(args.max_new_tokens or 2048, context - len(ids)), stop_ids,
                  tokenizer.stream(skip_special_tokens=True), routing)
        # The template drops the thinking of earlier turns itself, so the whole answer is kept.
        messages.append({"role": "assistant", "content": tokenizer.decode(new, skip_special_tokens=True)})
    if routing:
        print(routing, file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # at the chat prompt or while loading; during generation run() handles it
        sys.exit(130)
