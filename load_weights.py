"""Hugging Face checkpoint folder (config.json + safetensors) -> model, without ever unpickling anything."""
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

import qwen3
from moe import Qwen3MoeConfig, Qwen3MoeForCausalLM

HEADS = {"ForCausalLM": qwen3.Qwen3ForCausalLM, "ForSequenceClassification": qwen3.Qwen3ForSequenceClassification,
         "ForTokenClassification": qwen3.Qwen3ForTokenClassification,
         "ForQuestionAnswering": qwen3.Qwen3ForQuestionAnswering}
# config.json's architectures[0] -> (config class, model class); MoE heads sit on the same classes
ARCHITECTURES = {f"Qwen3{moe}{head}": (Qwen3MoeConfig if moe else qwen3.Qwen3Config, cls)
                 for moe in ("", "Moe") for head, cls in HEADS.items()}
ARCHITECTURES["Qwen3MoeForCausalLM"] = (Qwen3MoeConfig, Qwen3MoeForCausalLM)
RENAMES = {"transformer.": "model."}  # question-answering checkpoints keep their backbone under "transformer."


def build_model(config: qwen3.Qwen3Config):
    """The causal LM for a config, dense or MoE; works under torch.device("meta")."""
    return (Qwen3MoeForCausalLM if isinstance(config, Qwen3MoeConfig) else qwen3.Qwen3ForCausalLM)(config)


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e!r})") from None
        if missing := [name for name in names if not (folder / name).exists()]:
            raise FileNotFoundError(f"{folder / missing[0]}: shard named in {index.name} is missing")
        return [folder / name for name in names]
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if pickles:
        raise ValueError(f"{folder} holds only pickled weights ({', '.join(sorted(pickles))}); they are not loaded "
                         "because unpickling can run arbitrary code. Convert them once with transformers: "
                         "AutoModel.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)")
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def free_memory(device: torch.device) -> int | None:
    """Bytes the device can still take, or None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # Linux; MemAvailable counts the page cache that can be dropped, unlike "free" memory
        meminfo = Path("/proc/meminfo").read_text()
        return int(next(line.split()[1] for line in meminfo.splitlines() if line.startswith("MemAvailable"))) * 1024
    except (OSError, StopIteration):
        return None


def check_fits(needed: int, device, dtype_name: str):
    free = free_memory(torch.device(device))
    if free is not None and needed > free:
        raise ValueError(f"the weights need {needed / 2**30:.2f} GiB in {dtype_name} but {device} has only "
                          f"{free / 2**30:.2f} GiB free; pick a smaller model or dtype (e.g. bfloat16)")


def stacked_experts(expected: dict):
    """For each matrix of moe.Experts: its name, its prefix, the number of experts and the checkpoint tensors that
    stand side by side in it (checkpoints store experts one by one, gate and up apart)."""
    for name, t in expected.items():
        prefix, kind = name.rsplit(".", 1)
        if prefix.endswith(".experts"):
            yield name, prefix, t.shape[0], ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)


def on_disk(expected: dict) -> dict:
    """Key -> shape of what a checkpoint holds for a model's state dict."""
    disk = {name: tuple(t.shape) for name, t in expected.items()}
    for name, prefix, E, parts in stacked_experts(expected):
        rows, cols = disk.pop(name)[1:]
        disk |= {f"{prefix}.{e}.{part}.weight": (rows // len(parts), cols) for e in range(E) for part in parts}
    return disk


def load_model(path, dtype: torch.dtype | None = None, device="cpu"):
    """Load a checkpoint folder into the model its config.json names, in eval mode. dtype=None keeps the file's."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    try:
        raw = json.loads((folder / "config.json").read_text())
        arch = (raw.get("architectures") or ["(none)"])[0]
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder / 'config.json'}: missing; a checkpoint folder needs its config.json") from None
    except (ValueError, AttributeError, TypeError) as e:
        raise ValueError(f"{folder / 'config.json'}: not a valid config.json ({e!r})") from None
    if arch not in ARCHITECTURES:
        raise ValueError(f"{folder / 'config.json'}: architecture {arch!r} is not Qwen3; "
                         f"expected one of {', '.join(ARCHITECTURES)}")
    config_class, model_class = ARCHITECTURES[arch]
    files = weight_files(folder)
    try:
        config = config_class.from_hf(raw)
        with torch.device("meta"):
            model = model_class(config)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"{folder / 'config.json'}: invalid value ({e!r})") from None
    expected = model.state_dict()
    disk = on_disk(expected)
    needed = (sum(p.numel() for p in model.parameters()) * dtype.itemsize if dtype
              else sum(f.stat().st_size for f in files))
    check_fits(needed, device, str(dtype or "the checkpoint's dtype").replace("torch.", ""))

    state = {}
    for file in files:
        try:
            with safe_open(file, "pt") as f:
                for key in f.keys():
                    name = next((new + key[len(old):] for old, new in RENAMES.items() if key.startswith(old)), key)
                    shape = tuple(f.get_slice(key).get_shape())  # read from the header, before any data
                    if name in disk and shape != disk[name]:
                        raise ValueError(f"{file.name}: tensor {key} has shape {shape}, the config asks for "
                                         f"{disk[name]}")
                    tensor = f.get_tensor(key)
                    state[name] = tensor.to(dtype=dtype or tensor.dtype, device=device)
        except SafetensorError as e:
            raise ValueError(f"{file}: truncated or corrupt safetensors file ({e})") from None
    if "lm_head.weight" in expected and config.tie_word_embeddings and "model.embed_tokens.weight" in state:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    missing, unexpected = sorted(disk.keys() - state.keys()), sorted(state.keys() - disk.keys())
    if missing or unexpected:
        raise ValueError(f"{folder}: the weights do not match {arch}: missing {missing[:8]}"
                         f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}")
    for name, prefix, E, parts in stacked_experts(expected):
        state[name] = torch.stack([torch.cat([state.pop(f"{prefix}.{e}.{part}.weight") for part in parts])
                                   for e in range(E)])
    model.load_state_dict(state, strict=True, assign=True)  # assign: the loaded tensors become the parameters
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # assign gave the head its own Parameter; share one again
    return model.to(device).eval()
