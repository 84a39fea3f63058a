"""Loading the policy, its reference and tokenizer; saving the result."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from pathlib import Path

import torch
from torch import nn

from preftune.config import DEFAULT_MODEL, ModelConfig
from preftune.errors import PreftuneError
from preftune.util import atomic_dir

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML_TEMPLATE, "qwen": CHATML_TEMPLATE}

ORIGINAL_TEMPLATE_ATTR = "_preftune_original_chat_template"  # set by load_tokenizer for template: none

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
        if tokenizer.chat_template is not None:  # put back in final/ by save_final
            setattr(tokenizer, ORIGINAL_TEMPLATE_ATTR, tokenizer.chat_template)
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


def build_policy_and_reference(
    cfg: ModelConfig, model_path: str, device: torch.device, need_reference: bool
) -> tuple[nn.Module, Reference | None]:
    from preftune.memory.checkpointing import selective_checkpoint_context

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
    with original_chat_template(tokenizer):
        if is_lora:
            atomic_dir(output_dir / "adapter", lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
            base = model.merge_and_unload()
        else:
            base = model
        atomic_dir(output_dir / "final", lambda tmp: (base.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))


@contextlib.contextmanager
def original_chat_template(tokenizer):
    """``template: none`` trains on plain text, but the saved model should still chat as the
    original did: while saving, the tokenizer has its original chat template back (unless
    another one was set after ``load_tokenizer``)."""
    original = getattr(tokenizer, ORIGINAL_TEMPLATE_ATTR, None)
    if original is None or tokenizer.chat_template is not None:
        yield
        return
    tokenizer.chat_template = original
    try:
        yield
    finally:
        tokenizer.chat_template = None
