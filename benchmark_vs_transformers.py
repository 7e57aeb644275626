"""Side-by-side speed of this project and Hugging Face transformers on the same checkpoint (a developer tool).

    python benchmark_vs_transformers.py CHECKPOINT_DIR --dtype bfloat16 --prompt-tokens 512 --new-tokens 32

Both run greedy generation in this process, in alternating rounds so that both see the same machine state;
prints the median prefill and decode tokens/s of each and their ratio. Needs transformers installed.
"""
import argparse
import statistics
import time

import torch
import transformers

import generate
from load_weights import load_model


class Clock(transformers.generation.streamers.BaseStreamer):
    """Notes the time of each put(): first the prompt, then each new token."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def time_ours(model, ids, new):
    start, stamps = time.perf_counter(), []
    for _ in generate.generate(model, ids[0], new):
        stamps.append(time.perf_counter())
    return stamps[0] - start, (stamps[-1] - stamps[0]) / (new - 1)


def time_transformers(model, ids, new):
    clock = Clock()
    start = time.perf_counter()
    model.generate(ids, do_sample=False, max_new_tokens=new, min_new_tokens=new, streamer=clock, pad_token_id=0)
    stamps = clock.times[1:]  # the first put() is the prompt
    return stamps[0] - start, (stamps[-1] - stamps[0]) / (new - 1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--only", choices=["ours", "transformers"], help="time one side alone")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    sides = {}
    if args.only != "transformers":
        sides["ours"] = (load_model(args.checkpoint, dtype), time_ours)
    if args.only != "ours":
        hf = transformers.AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=dtype).eval()
        sides["transformers"] = (hf, time_transformers)
    ids = torch.randint(0, 151643, (1, args.prompt_tokens))
    results = {name: [] for name in sides}
    with torch.inference_mode():
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for name, (model, timer) in sides.items():
                prefill, decode = timer(model, ids, args.new_tokens)
                if round_:
                    results[name].append((prefill, decode))
    print(f"{args.checkpoint} {args.dtype}, prompt {args.prompt_tokens}, {args.new_tokens} new tokens, "
          f"{args.rounds} rounds, {torch.get_num_threads()} threads (medians)")
    summary = {}
    for name, runs in results.items():
        prefill = args.prompt_tokens / statistics.median(r[0] for r in runs)
        decode_ms = 1000 * statistics.median(r[1] for r in runs)
        summary[name] = (prefill, decode_ms)
        print(f"{name:>13}: prefill {prefill:8.1f} tok/s   decode {decode_ms:6.1f} ms/token "
              f"({1000 / decode_ms:.1f} tok/s)")
    if len(summary) == 2:
        (p1, d1), (p2, d2) = summary["ours"], summary["transformers"]
        print(f"{'ours / theirs':>13}: prefill {p1 / p2:.2f}x   decode {d2 / d1:.2f}x")


if __name__ == "__main__":
    main()
