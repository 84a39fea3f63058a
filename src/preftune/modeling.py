"""Loading the policy, its reference and tokenizer; saving the result."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from preftune.config import DEFAULT_MODEL, ModelConfig
from preftune.errors import PreftuneError

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML_TEMPLATE, "qwen": CHATML_TEMPLATE}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def preftune_home() -> Path:
    return Path(os.environ.get("PREFTUNE_HOME", Path.home() / ".cache" / "preftune"))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PreftuneError(f"device '{name}' requested but CUDA is not available")
    return device


def resolve_model_path(name: str) -> str:
    """The offline default model resolves to a converted copy under $PREFTUNE_HOME."""
    if name == DEFAULT_MODEL:
        from preftune.smollm2 import ensure_default_model

        return str(ensure_default_model())
    path = Path(name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise PreftuneError(f"model directory '{name}' has no config.json")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise PreftuneError(f"model '{name}' not found: not a local directory nor a hub id (owner/name)")
    return name  # a hub id, for users with a network


def load_tokenizer(cfg: ModelConfig, model_path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise PreftuneError(f"cannot load tokenizer from '{model_path}': {str(e).splitlines()[0]}") from None
    if cfg.template == "none":
        tokenizer.chat_template = None
    elif cfg.template is not None:
        tokenizer.chat_template = NAMED_TEMPLATES[cfg.template]
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def weight_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    return torch.float32  # trained weights stay fp32; bf16/fp16 run as autocast


def load_causal_lm(path: str, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise PreftuneError(f"cannot load model from '{path}': {str(e).splitlines()[0]}") from None
    disable_dropout(model)
    return model.to(device)


def disable_dropout(model: nn.Module) -> None:
    """Dropout makes the policy and reference log-probs differ at step 0; TRL turns it off too."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if config is not None and isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)


def apply_lora(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if cfg.lora_target in ("all", ["all"]) else cfg.lora_target
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        raise PreftuneError(f"lora_target {cfg.lora_target!r}: {str(e).splitlines()[0]}") from None


class Reference:
    """Reference log-probs come from here: the adapter-disabled policy (LoRA) or a frozen copy (full)."""

    def __init__(self, policy: nn.Module, frozen: nn.Module | None):
        self.policy = policy
        self.frozen = frozen

    @property
    def model(self) -> nn.Module:
        return self.frozen if self.frozen is not None else self.policy

    def context(self):
        if self.frozen is None:
            return self.policy.disable_adapter()
        return contextlib.nullcontext()


def _saved_ops() -> frozenset:
    aten = torch.ops.aten
    names = (
        "mm", "addmm", "bmm", "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention", "_flash_attention_forward",
        "_efficient_attention_forward",
    )  # fmt: skip
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


def _selective_policy(ctx, op, *args, **kwargs):  # called for every op of every layer: keep it light
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpoint_context():
    """Selective activation checkpointing (``gradient_checkpointing: selective``) for one layer:
    the outputs of matmuls and attention are kept from the forward, everything between them
    (RMSNorm, dtype casts, rotary embedding, SiLU and products, GQA's key/value repeat) is
    recomputed in backward from those and the layer's input. On SmolLM2-135M that keeps about
    14 of the 38 KB per token and layer that a plain forward saves, and the rerun costs only
    elementwise work. The recomputed ops see the same inputs, so the numbers are unchanged."""
    return create_selective_checkpoint_contexts(_selective_policy)


_SAVED_OPS = _saved_ops()


def build_policy_and_reference(
    cfg: ModelConfig, model_path: str, device: torch.device, need_reference: bool
) -> tuple[nn.Module, Reference | None]:
    dtype = weight_dtype(cfg, device)
    model = load_causal_lm(model_path, cfg, dtype, device)
    mode = cfg.checkpointing_mode
    if mode != "none":
        kwargs: dict = {"use_reentrant": False}
        if mode == "selective":
            kwargs["context_fn"] = selective_checkpoint_context
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    if cfg.finetuning_type == "lora":
        if mode != "none":
            model.enable_input_require_grads()
        policy = apply_lora(model, cfg)
        return policy, (Reference(policy, None) if need_reference else None)
    if device.type == "cpu":
        own_weights(model)
    reference = None
    if need_reference:
        if cfg.ref_model_name_or_path:
            frozen = load_causal_lm(resolve_model_path(cfg.ref_model_name_or_path), cfg, dtype, device)
        else:
            frozen = copy.deepcopy(model)
        frozen.eval().requires_grad_(False)
        reference = Reference(model, frozen)
    return model, reference


def own_weights(model: nn.Module) -> None:
    """Copy every parameter off the safetensors file mapping it was loaded into.

    The first optimizer step of full fine-tuning writes every weight, and a write into the
    private file mapping copies it page by page on fault: on SmolLM2-135M (CPU) that made the
    first AdamW step take 1.5 s instead of 0.3 s. One copy here costs 0.17 s. Same values.
    """
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()


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
    device = next(model.parameters()).device
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
    import json

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


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in state]
    if missing:
        raise PreftuneError(f"checkpoint does not match the model: {len(missing)} trainable tensors missing")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].device))


def save_final(model: nn.Module, tokenizer, output_dir: Path, is_lora: bool) -> None:
    """Write ``adapter/`` (LoRA) and ``final/`` (merged weights + tokenizer) atomically.

    Each directory is written under a temporary name and renamed into place, so a crash
    never leaves a half-written ``final/``. LoRA: the adapter is merged into the base weights in
    place (no second copy of the model), so ``model`` must not be used afterwards.
    """
    if is_lora:
        _atomic_dir(output_dir / "adapter", lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
        base = model.merge_and_unload()
    else:
        base = model
    _atomic_dir(output_dir / "final", lambda tmp: (base.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))


def _atomic_dir(target: Path, write) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    old = target.with_name(f".{target.name}.old")
    for path in (tmp, old):
        if path.exists():
            shutil.rmtree(path)
    tmp.mkdir(parents=True)
    write(tmp)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    if old.exists():
        shutil.rmtree(old)
