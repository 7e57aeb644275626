"""The Qwen3 tokenizer on tiktoken: byte-level BPE over Qwen's vocabulary, added tokens, the chat template."""
import codecs
import json
import re
import unicodedata
from pathlib import Path

import tiktoken

# Qwen's pre-tokenizer: text is cut into these pieces before BPE runs inside each piece.
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
         r"|\s+(?!\S)|\s+")


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: tokenizer.json spells each byte as a printable character; this undoes it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(c): b for c, b in zip(printable + [256 + i for i in range(len(others))], printable + others)}


class Qwen3Tokenizer:
    def __init__(self, path):
        folder = Path(path)
        file = folder / "tokenizer.json"
        if not file.exists():
            raise FileNotFoundError(f"{folder}: no tokenizer.json; pass a Qwen3 checkpoint folder")
        data = json.loads(file.read_text(encoding="utf-8"))
        to_byte = byte_decoder()
        # In Qwen's vocabulary a token's id is its BPE merge rank, so tiktoken needs no merges list.
        ranks = {bytes(to_byte[ch] for ch in token): i for token, i in data["model"]["vocab"].items()}
        self.added = {t["content"]: t["id"] for t in data["added_tokens"]}
        self.special_ids = {t["id"] for t in data["added_tokens"] if t["special"]}  # what skip_special_tokens drops
        self.enc = tiktoken.Encoding("qwen3", pat_str=SPLIT, mergeable_ranks=ranks, special_tokens=self.added)
        longest_first = sorted(self.added, key=len, reverse=True)  # so <|im_end|> wins over any prefix of it
        self.added_pattern = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
        self.eos_token_id = self.added[config.get("eos_token") or "<|im_end|>"]
        self.pad_token_id = self.added[config.get("pad_token") or "<|endoftext|>"]
        self.stop_ids = (self.added["<|im_end|>"], self.added["<|endoftext|>"])  # end of a chat turn, of a text

    def encode(self, text: str) -> list[int]:
        ids = []
        # Added tokens are matched in the raw text, the rest is NFC-normalised (tiktoken does not normalise).
        for i, part in enumerate(self.added_pattern.split(text)):
            if i % 2:
                ids.append(self.added[part])
            elif part:
                ids += self.enc.encode_ordinary(unicodedata.normalize("NFC", part))
        return ids

    def token_bytes(self, ids, skip_special_tokens=False) -> bytes:
        # Ids past the vocabulary (the model's embedding is padded to 151936) decode to nothing.
        return self.enc.decode_bytes([i for i in ids if 0 <= i < self.enc.n_vocab
                                      and not (skip_special_tokens and i in self.special_ids)])

    def decode(self, ids, skip_special_tokens=False) -> str:
        return self.token_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def stream(self, skip_special_tokens=False):
        """A function token id -> text ready to print; call it with None at the end to flush.
        Bytes of a character split over tokens are held back until it is complete."""
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda i: utf8.decode(b"", final=True) if i is None else utf8.decode(
            self.token_bytes([i], skip_special_tokens))

    def apply_chat_template(self, messages, add_generation_prompt=True, enable_thinking=True) -> str:
        """The prompt Qwen3's official chat template renders, for system, user and assistant messages."""
        def is_query(m):
            return m["role"] == "user" and not (m["content"].startswith("<tool_response>")
                                                and m["content"].endswith("</tool_response>"))
        last_query = max((i for i, m in enumerate(messages) if is_query(m)), default=len(messages) - 1)
        prompt = ""
        for i, m in enumerate(messages):
            role, content = m["role"], m["content"]
            if role in ("system", "user"):
                prompt += f"<|im_start|>{role}\n{content}<|im_end|>\n"
            elif role == "assistant":
                reasoning = m.get("reasoning_content")
                if reasoning is None:
                    reasoning = ""
                    if "</think>" in content:
                        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                        content = content.split("</think>")[-1].lstrip("\n")
                # Thinking is shown only after the last user query: earlier turns drop it to save context.
                if i > last_query and (i == len(messages) - 1 or reasoning):
                    content = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
                prompt += f"<|im_start|>assistant\n{content}<|im_end|>\n"
            else:
                raise ValueError(f"message {i}: role {role!r} is not supported (no tool calling)")
        if add_generation_prompt:
            prompt += "<|im_start|>assistant\n" + ("" if enable_thinking else "<think>\n\n</think>\n\n")
        return prompt
