"""Encoding speed of tokenizer.Qwen3Tokenizer (tiktoken) against the `tokenizers` library, one thread each.

    python benchmark_tokenizer.py CHECKPOINT_DIR [TEXT_FILE ...]

Without text files it encodes this repository's sources and a mix of languages. Prints both speeds and checks
that both give the same ids. Needs `pip install tokenizers`.
"""
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["RAYON_NUM_THREADS"] = "1"  # tokenizers' thread pool, before it is imported
os.environ["TOKENIZERS_PARALLELISM"] = "false"
import tiktoken  # noqa: E402
import tokenizers  # noqa: E402

from tokenizer import Qwen3Tokenizer  # noqa: E402

MIXED = ("The quick brown fox jumps over the lazy dog. 你好，世界！今天天气很好。こんにちは、世界。안녕하세요. "
         "Привет, мир! مرحبا بالعالم 1234567890 3.14159 café naïve 👍🏽🎉 \n\tdef f(x):\n    return x ** 2\n")


def median_seconds(encode, text, rounds=5):
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        encode(text)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    folder, files = sys.argv[1], sys.argv[2:]
    text = "".join(Path(f).read_text(encoding="utf-8") for f in files) if files else (
        "".join(p.read_text() for p in sorted(Path(__file__).parent.glob("*.py"))) * 20 + MIXED * 3000)
    ours = Qwen3Tokenizer(folder)
    ref = tokenizers.Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    ids = ours.encode(text)
    assert ids == ref.encode(text).ids, "the two tokenizers disagree on this text"
    mb = len(text.encode()) / 1e6
    print(f"{mb:.1f} MB of text, {len(ids):,} tokens, one thread each (tiktoken {tiktoken.__version__}, "
          f"tokenizers {tokenizers.__version__})")
    lines = text.splitlines(keepends=True)
    for name, ours_encode, ref_encode in [
            ("one long text", ours.encode, lambda t: ref.encode(t).ids),
            (f"{len(lines):,} lines one by one", lambda t: [ours.encode(x) for x in lines],
             lambda t: [ref.encode(x).ids for x in lines])]:
        a, b = median_seconds(ours_encode, text), median_seconds(ref_encode, text)
        print(f"{name}:\n  Qwen3Tokenizer (tiktoken): {mb / a:6.1f} MB/s\n  tokenizers               : "
              f"{mb / b:6.1f} MB/s\n  speed-up: {b / a:.2f}x")


if __name__ == "__main__":
    main()
