"""Frozen fp32 Linear weights held in the autocast dtype while training, and put back after."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from preftune.config import ModelConfig
from preftune.modeling import load_causal_lm, unwrap_peft
from preftune.util import model_device


def compact_frozen_linears(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Store frozen fp32 Linear weights (LoRA's base layers) in the autocast ``dtype``.

    Autocast casts every Linear weight to ``dtype`` before the matmul, so under autocast the
    values are the same; what goes is the fp32 copy and the cast that each forward makes and
    backward keeps (~40% of a LoRA step's memory on SmolLM2-135M). The output embedding is left
    alone (usually tied to the input one). The remaining fp32 tensors are copied out of the
    safetensors file mapping so its pages are released. Outside autocast the compacted model
    would compute in ``dtype``: call ``restore_frozen_linears`` before using it that way.
    Returns the compacted modules' names.
    """
    hf = unwrap_peft(model)
    head, embed = hf.get_output_embeddings(), hf.get_input_embeddings()
    tied = embed.weight if embed is not None else None
    names = []
    with torch.no_grad():
        for name, module in hf.named_modules():
            weight = getattr(module, "weight", None)
            if (isinstance(module, nn.Linear) and module is not head and weight is not None and weight is not tied
                    and not weight.requires_grad and weight.dtype == torch.float32):  # fmt: skip
                module.weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
                names.append(name)
        for p in model.parameters():
            if p.dtype == torch.float32 and not p.requires_grad:
                p.data = p.data.clone()  # off the file mapping: once nothing points into it, it is unmapped
    return names


def restore_frozen_linears(model: nn.Module, names: list[str], model_path: str, cfg: ModelConfig) -> None:
    """Put back the fp32 weights ``compact_frozen_linears`` replaced, read again from the model files.

    Tensor by tensor from the safetensors files where the names match (no second model in memory),
    else through a full reload.
    """
    if not names:
        return
    device = model_device(model)
    modules = dict(unwrap_peft(model).named_modules())
    keys = {name: name.removesuffix(".base_layer") + ".weight" for name in names}
    weights = _read_safetensors(model_path, list(keys.values()))
    if weights is None:
        original = dict(load_causal_lm(model_path, cfg, torch.float32, device).named_parameters())
        weights = {key: original[key].detach() for key in keys.values() if key in original}
    with torch.no_grad():
        for name, key in keys.items():
            source = weights.pop(key, None)
            if source is None or tuple(source.shape) != tuple(modules[name].weight.shape):
                raise RuntimeError(f"cannot restore {name}: the model files have no matching {key}")
            modules[name].weight = nn.Parameter(source.to(device=device, dtype=torch.float32), requires_grad=False)


def _read_safetensors(model_path: str, keys: list[str]) -> dict[str, torch.Tensor] | None:
    """``keys`` read from a local model directory's safetensors files (copies, files closed after), or None."""
    from safetensors import safe_open

    root = Path(model_path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
    elif (root / "model.safetensors").is_file():
        with safe_open(root / "model.safetensors", framework="pt") as f:
            weight_map = {key: "model.safetensors" for key in f.keys()}
    else:
        return None
    if any(key not in weight_map for key in keys):
        return None
    out = {}
    for file in sorted({weight_map[key] for key in keys}):
        with safe_open(root / file, framework="pt") as f:
            for key in keys:
                if weight_map[key] == file:
                    out[key] = f.get_tensor(key)
    return out
