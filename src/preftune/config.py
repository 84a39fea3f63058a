"""Typed run configuration.

Keys are flat in YAML (``beta: 0.1``, ``lora_r: 16``) and named like TRL's DPOConfig
wherever TRL has one. Internally they are grouped in small dataclasses, one per concern.
LLaMA-Factory DPO YAML is accepted as is: its keys are translated by ``LLAMAFACTORY_ALIASES``
(see :mod:`preftune.data.llamafactory`, which holds all LLaMA-Factory compatibility).
Unknown keys are errors that suggest the closest known key.
"""

from __future__ import annotations

import os
import re
import sys
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from preftune.data.llamafactory import (  # noqa: F401
    IGNORED_KEYS,
    LLAMAFACTORY_ALIASES,
    ignored_key_warnings,
    translate_config_keys,
)
from preftune.config_values import INT_RANGE, SEED_RANGE, coerce, load_yaml_value, parse_override  # noqa: F401
from preftune.errors import PreftuneError, shown
from preftune.util import did_you_mean

DEFAULT_MODEL = "smollm2-135m-instruct"


def doc(text: str, default: Any = MISSING, default_factory: Any = MISSING):
    """A dataclass field carrying its documentation (shown by ``preftune train --help``)."""
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass
class ModelConfig:
    model_name_or_path: str = doc(
        "Local model directory or hub id; 'smollm2-135m-instruct' is the offline default.", DEFAULT_MODEL
    )
    ref_model_name_or_path: str | None = doc(
        "Reference model for full fine-tuning (default: a frozen copy of the starting policy).", None
    )
    dtype: str = doc("Weight dtype: auto (float32 on CPU), float32, bfloat16 or float16.", "auto")
    trust_remote_code: bool = doc("Allow custom modelling code from the model directory.", False)
    finetuning_type: str = doc("lora (adapter on a frozen base) or full.", "lora")
    lora_r: int = doc("LoRA rank.", 16)
    lora_alpha: int = doc("LoRA scaling numerator (scale = lora_alpha / lora_r).", 32)
    lora_dropout: float = doc("Dropout on the LoRA branch.", 0.0)
    lora_target: str | list[str] = doc(
        "'all' (every linear layer except the LM head) or a list of module names.", "all"
    )
    template: str | None = doc(
        "Chat template override: chatml, qwen or none; default: the tokenizer's own template.", None
    )
    gradient_checkpointing: bool | str = doc(
        "Recompute activations in backward to save memory. false: keep them all; true or 'full': keep "
        "only each decoder layer's input and rerun the layer in backward; 'selective': keep each layer's "
        "matmul and attention outputs and rerun only the cheap ops between them (norms, casts, rotary, "
        "activation): on SmolLM2-135M full fine-tuning in bf16, 57% of full's memory saving for 36% of its extra "
        "time. Same numbers in every mode.",
        False,
    )

    @property
    def checkpointing_mode(self) -> str:
        """none, full or selective."""
        gc = self.gradient_checkpointing
        return gc if isinstance(gc, str) else ("full" if gc else "none")


@dataclass
class DataConfig:
    train_file: str | None = doc("Preference pairs: .json, .jsonl, .csv, .parquet or a save_to_disk directory.", None)
    eval_file: str | None = doc("Held-out pairs for evaluation, same formats as train_file.", None)
    eval_split: float = doc("Fraction of train_file held out for evaluation when eval_file is not set.", 0.0)
    dataset: str | None = doc("LLaMA-Factory dataset name(s) in dataset_dir/dataset_info.json (comma-separated).", None)
    dataset_dir: str = doc("Directory holding dataset_info.json for `dataset`.", "data")
    format: str = doc("Data format: auto, standard, conversational, alpaca or sharegpt.", "auto")
    system_prompt: str | None = doc("System message added to prompts that have none (chat templates only).", None)
    max_length: int = doc("Maximum tokens of prompt + completion.", 1024)
    max_prompt_length: int | None = doc("Prompts longer than this are cut from the left first.", None)
    max_samples: int | None = doc("Use at most this many training pairs (after loading, before splitting).", None)
    special_tokens_in_text: str = doc(
        "Data text that spells one of the tokenizer's special tokens (<|im_end|>, <|im_start|>assistant, ...): "
        "literal (tokenized as the plain text it is, so a data row cannot end a turn), error (stop, naming the "
        "pair and field) or parse (read as the control token). The data line counts such pairs.",
        "literal",
    )
    generate: str | list[str] | None = doc(
        "A `preftune generate` command line (without 'preftune generate') that builds train_file; run first, "
        "from the config's directory, when train_file does not exist yet.",
        None,
    )
    eval_prompts: str | None = doc(
        "Held-out prompts (.txt, one per line, or .jsonl with 'prompt') for before/after answers in report.md "
        "and for the collapse guard.",
        None,
    )
    retain_prompts: str | None = doc(
        "Prompts training should not change (unrelated to the data; same file formats as eval_prompts): the "
        "collapse guard checks the policy still gives the original model's answers to them, and that its own "
        "answers to them do not degenerate.",
        None,
    )


@dataclass
class LossConfig:
    loss_type: str | list[str] = doc(
        "Loss name or list of names: sigmoid, hinge, ipo, robust, bco_pair, sppo_hard, nca_pair, "
        "apo_zero, apo_down, exo_pair, simpo, orpo, sft. RPO = [sigmoid, sft].",
        "sigmoid",
    )
    loss_weights: list[float] | None = doc("Weight of each loss in loss_type (default 1.0 each).", None)
    beta: float = doc("Strength of the KL constraint to the reference (temperature of the implicit reward).", 0.1)
    label_smoothing: float = doc("Assumed fraction of flipped labels (robust, exo_pair).", 0.0)
    simpo_gamma: float = doc("SimPO target reward margin (in reward units, as TRL's CPOConfig).", 0.5)
    orpo_alpha: float = doc("ORPO's lambda: weight of the odds-ratio term next to the chosen NLL.", 0.1)


@dataclass
class TrainingConfig:
    output_dir: str = doc("Where the run writes its reports, checkpoints and final model.", "outputs/run")
    overwrite_output_dir: bool = doc("Allow writing into an output_dir that already holds a finished run.", False)
    learning_rate: float = doc("Peak AdamW learning rate.", 5e-6)
    weight_decay: float = doc("AdamW weight decay.", 0.0)
    adam_beta1: float = doc("AdamW beta1.", 0.9)
    adam_beta2: float = doc("AdamW beta2.", 0.999)
    adam_epsilon: float = doc("AdamW epsilon.", 1e-8)
    lr_scheduler_type: str = doc("linear, cosine or constant (after warmup).", "linear")
    warmup_ratio: float = doc("Fraction of optimizer steps spent warming up (ignored if warmup_steps > 0).", 0.0)
    warmup_steps: int = doc("Warmup optimizer steps.", 0)
    per_device_train_batch_size: int = doc("Pairs per micro-batch.", 4)
    per_device_eval_batch_size: int = doc("Pairs per evaluation batch.", 8)
    gradient_accumulation_steps: int = doc("Micro-batches per optimizer step.", 1)
    max_grad_norm: float = doc("Clip the global gradient norm to this (0 disables).", 1.0)
    num_train_epochs: float = doc("Passes over the training pairs (fractions allowed).", 1.0)
    max_steps: int = doc("Optimizer steps to run; overrides num_train_epochs when > 0.", -1)
    bf16: bool | str = doc(
        "bfloat16 autocast with float32 master weights. auto: on a GPU that supports it, and on a CPU only with "
        "native bf16 matmuls (AVX-512 BF16 or AMX; elsewhere bf16 runs many times slower than fp32).", "auto"
    )
    fp16: bool | str = doc(
        "float16 autocast with float32 master weights and loss scaling (GPU). auto: never chosen on its own.", "auto"
    )
    seed: int = doc("Seed for initialization, data order and dropout: same seed, same metrics.", 42)
    logging_steps: int = doc("Log metrics every N optimizer steps.", 10)
    eval_steps: int | None = doc("Evaluate every N optimizer steps (always once at the end when eval data exists).", None)
    save_steps: int | None = doc("Save a resumable checkpoint every N optimizer steps.", None)
    save_total_limit: int | None = doc("Keep at most this many checkpoints (oldest removed).", None)
    resume_from_checkpoint: bool | str | None = doc(
        "true: continue from the newest checkpoint in output_dir; or a checkpoint path.", None
    )
    fast_path: bool = doc(
        "One [prompt | chosen | rejected] sequence per pair, pairs packed into rows, LM head only on completion "
        "positions; gives the simple padded path's numbers (tested), faster and in less memory.",
        True,
    )
    max_tokens_per_row: int | None = doc(
        "Fast path: token budget of a packed row (default: the longest pair of the micro-batch).", None
    )
    row_length_multiple: int | None = doc(
        "Fast path: packed rows are padded to a multiple of this many tokens (1: no rounding; default: 8 under "
        "bf16/fp16 autocast on CPU, else 1). Fewer distinct shapes: torch's CPU bf16 attention backward keeps "
        "~5 MB of kernels per sequence length it meets (up to ~0.8 GB); padding is masked out, so the numbers "
        "stay the same.",
        None,
    )
    fused_swiglu: bool = doc(
        "Llama-family MLPs (silu(gate) * up) recompute silu(gate) in backward instead of keeping it (preftune's "
        "SwiGLU; without gradient checkpointing): on SmolLM2-135M 6 KB less per token and layer in fp32; the same "
        "numbers bit for bit.",
        True,
    )
    short_row_attention: bool = doc(
        "CPU training under bf16 autocast: packed rows of up to 256 tokens take preftune's attention, which keeps "
        "the bf16 attention probabilities for backward (H x L x 2 bytes per token and layer) instead of torch's "
        "flash kernel, whose CPU backward is about 2x slower on such rows; same numbers to bf16 rounding.",
        True,
    )
    bf16_weight_grads: bool = doc(
        "Full fine-tuning under bf16 autocast: hold the gradients of Linear weights in bf16 from backward to the "
        "optimizer step, which upcasts them a few tensors at a time (they are bf16 matmul results cast to fp32: "
        "same numbers, half the memory; a weight whose gradient is not exactly bf16 keeps fp32).",
        True,
    )
    compact_frozen_weights: bool = doc(
        "Under bf16/fp16 autocast, hold frozen Linear weights in that dtype (autocast casts them to it anyway: "
        "same numbers, less memory, no cast per step): LoRA's base layers while training (final/ is merged from "
        "the fp32 originals), and full fine-tuning's reference copy while it computes the cached log-probs.",
        True,
    )
    precompute_ref_log_probs: bool | None = doc(
        "Compute the reference log-probs once before training and cache them under $PREFTUNE_HOME "
        "(default: on whenever the loss needs a reference).",
        None,
    )
    stop_on_collapse: bool = doc(
        "Stop when the collapse guard fires and keep the last healthy weights as final/ (otherwise: warn).", False
    )
    collapse_max_logp_drop: float = doc(
        "Collapse guard: the most nats per chosen token the policy may fall below the reference.", 1.0
    )
    collapse_max_retain_drop: float = doc(
        "Collapse guard: the most nats per token (mean over retain_prompts) the policy may lose on the original "
        "model's answers to retain_prompts.",
        0.05,
    )
    guard_prompts: int = doc("Collapse guard: how many eval_prompts to answer at each check (0: none).", 4)
    guard_max_new_tokens: int = doc("Collapse guard: answer length in tokens.", 48)
    eval_max_new_tokens: int = doc("Length of the before/after answers to eval_prompts in report.md.", 96)
    device: str = doc("auto, cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK).", "auto")
    distributed: str = doc(
        "Under torchrun: ddp (every rank holds the model; gradients summed once per optimizer step) or fsdp "
        "(FSDP2 fully_shard per decoder layer, then the root; full fine-tuning). Ignored in a single process.",
        "ddp",
    )
    ddp_timeout: int = doc(
        "Under torchrun: seconds a rank waits for the others (a collective, a barrier) before the run ends with "
        "an error instead of hanging.",
        1800,
    )
    report_to: str | list[str] | None = doc(
        "tensorboard: TensorBoard event files of every logged scalar under output_dir/runs; none (or []): no "
        "logger.",
        "none",
    )
    progress: bool = doc("Show a progress bar.", True)

    @property
    def uses_tensorboard(self) -> bool:
        """``report_to`` names tensorboard (validated at load: nothing else is accepted)."""
        return "tensorboard" in report_targets(self.report_to)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "loss": LossConfig,
    "training": TrainingConfig,
}

LOSS_NAMES = (
    "sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair",
    "apo_zero", "apo_down", "exo_pair", "simpo", "orpo", "sft",
)  # fmt: skip
CHOICES: dict[str, tuple[str, ...]] = {
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "finetuning_type": ("lora", "full"),
    "format": ("auto", "standard", "conversational", "alpaca", "sharegpt"),
    "lr_scheduler_type": ("linear", "cosine", "constant"),
    "template": ("chatml", "qwen", "none"),
    "distributed": ("ddp", "fsdp"),
    "special_tokens_in_text": ("literal", "error", "parse"),
}
REPORT_TARGETS = ("tensorboard", "none")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d{1,3})?")
# Integers go to torch and numpy as int64 (the seed as uint64): a larger one fails deep inside them.
CHECKPOINTING_MODES = ("full", "selective")

@dataclass
class TrainConfig:
    """The whole run: flat keys, grouped by concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    base_dir: str | None = field(default=None, repr=False, compare=False)  # directory of the YAML, if any

    def to_flat(self) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for name in SECTIONS:
            flat.update(asdict(getattr(self, name)))
        return flat

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_flat(), sort_keys=False, allow_unicode=True)

    @property
    def loss_types(self) -> list[str]:
        lt = self.loss.loss_type
        return [lt] if isinstance(lt, str) else list(lt)


def all_fields() -> dict[str, tuple[str, Any]]:
    """Flat key -> (section name, dataclass Field)."""
    out = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            out[f.name] = (section, f)
    return out


# "did you mean" suggests a key or value at least this similar (difflib ratio).
_HINT_CUTOFF = 0.5


def _unknown_key(key: Any, where: str | None) -> PreftuneError:
    if not isinstance(key, str):
        return PreftuneError(f"keys must be names, got {shown(key)} (a {type(key).__name__})", where)
    suggestion = ""
    if len(key) <= 100:  # difflib is quadratic in the length
        suggestion = did_you_mean(key, list(all_fields()) + list(LLAMAFACTORY_ALIASES), _HINT_CUTOFF)
    return PreftuneError(f"unknown key {shown(key)}{suggestion} (see `preftune train --help`)", where)


def report_targets(value: Any) -> list[str]:
    """``report_to`` as a list of loggers, ``none`` dropped."""
    items = [] if value is None else [value] if isinstance(value, str) else list(value)
    return [item for item in items if item != "none"]


def check_device(name: Any, where: str | None = None, key: str = "device") -> str:
    """auto, cpu, cuda, cuda:N (or mps): anything else stops before torch is asked about it."""
    if not isinstance(name, str) or not DEVICE_PATTERN.fullmatch(name):
        raise PreftuneError(f"'{key}' is {shown(name)}; use auto, cpu, cuda or cuda:N", where)
    return name


def _hint(word: str, options) -> str:
    return did_you_mean(word, options, _HINT_CUTOFF) if len(word) <= 100 else ""  # difflib: quadratic


def _validate(cfg: TrainConfig, where: str | None) -> None:
    flat = cfg.to_flat()
    for key, options in CHOICES.items():
        value = flat[key]
        if value is not None and value not in options:
            extra = _hint(str(value), options)
            raise PreftuneError(f"'{key}' is {shown(value)}{extra} (choose from {', '.join(options)})", where)
    ckpt = flat["gradient_checkpointing"]
    if isinstance(ckpt, str) and ckpt not in CHECKPOINTING_MODES:
        extra = _hint(ckpt, CHECKPOINTING_MODES)
        raise PreftuneError(
            f"'gradient_checkpointing' is {shown(ckpt)}{extra} (choose from true, false, "
            f"{', '.join(CHECKPOINTING_MODES)})",
            where,
        )
    for name in cfg.loss_types:
        if name not in LOSS_NAMES:
            extra = _hint(name, LOSS_NAMES)
            raise PreftuneError(f"unknown loss_type {shown(name)}{extra} (known: {', '.join(LOSS_NAMES)})", where)
    if not cfg.loss_types:
        raise PreftuneError("'loss_type' must name at least one loss", where)
    weights = cfg.loss.loss_weights
    if weights is not None and len(weights) != len(cfg.loss_types):
        raise PreftuneError(
            f"'loss_weights' has {len(weights)} values but loss_type has {len(cfg.loss_types)}", where
        )
    for name, weight in zip(cfg.loss_types, weights or []):
        if weight <= 0:
            raise PreftuneError(
                f"'loss_weights' must be > 0, got {weight} for {name} (leave a loss out of loss_type instead)", where
            )
    positive = ["learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size",
                "gradient_accumulation_steps", "max_length", "logging_steps", "beta", "lora_r", "lora_alpha",
                "collapse_max_logp_drop", "collapse_max_retain_drop", "guard_max_new_tokens",
                "eval_max_new_tokens", "ddp_timeout"]  # fmt: skip
    for key in positive:
        if flat[key] <= 0:
            raise PreftuneError(f"'{key}' must be > 0, got {flat[key]}", where)
    for key in ("eval_steps", "save_steps", "save_total_limit", "max_prompt_length", "max_samples",
                "max_tokens_per_row", "row_length_multiple"):
        if flat[key] is not None and flat[key] <= 0:
            raise PreftuneError(f"'{key}' must be > 0, got {flat[key]}", where)
    nonneg = ["weight_decay", "warmup_steps", "max_grad_norm", "num_train_epochs", "lora_dropout", "adam_epsilon",
              "guard_prompts", "orpo_alpha"]  # fmt: skip
    for key in nonneg:
        if flat[key] < 0:
            raise PreftuneError(f"'{key}' must be >= 0, got {flat[key]}", where)
    if flat["lora_dropout"] >= 1.0:
        raise PreftuneError(f"'lora_dropout' must be in [0, 1), got {flat['lora_dropout']} (1 drops every input)",
                            where)  # fmt: skip
    if flat["max_length"] < 2:
        raise PreftuneError(f"'max_length' must be at least 2 (a prompt and a reply token), got {flat['max_length']}",
                            where)  # fmt: skip
    multiple = flat["row_length_multiple"]
    if multiple is not None and multiple > flat["max_length"]:
        raise PreftuneError(
            f"'row_length_multiple' ({multiple}) must be at most max_length ({flat['max_length']}): packed rows are "
            "padded to a multiple of it",
            where,
        )
    check_device(flat["device"], where)
    if not flat["output_dir"].strip():
        raise PreftuneError("'output_dir' is empty; name the directory the run writes into", where)
    targets = flat["report_to"]
    for target in [] if targets is None else [targets] if isinstance(targets, str) else targets:
        if target not in REPORT_TARGETS:
            raise PreftuneError(
                f"'report_to' names {shown(target)}; preftune writes TensorBoard event files (report_to: tensorboard) "
                "or nothing (none)",
                where,
            )
    if not 0.0 <= flat["eval_split"] < 1.0:
        raise PreftuneError(f"'eval_split' must be in [0, 1), got {flat['eval_split']}", where)
    if not 0.0 <= flat["warmup_ratio"] < 1.0:
        raise PreftuneError(f"'warmup_ratio' must be in [0, 1), got {flat['warmup_ratio']}", where)
    if not 0.0 <= flat["label_smoothing"] < 0.5:
        raise PreftuneError(f"'label_smoothing' must be in [0, 0.5), got {flat['label_smoothing']}", where)
    if not (0.0 <= flat["adam_beta1"] < 1.0 and 0.0 <= flat["adam_beta2"] < 1.0):
        raise PreftuneError("'adam_beta1' and 'adam_beta2' must be in [0, 1)", where)
    if flat["max_prompt_length"] is not None and flat["max_prompt_length"] >= flat["max_length"]:
        raise PreftuneError(
            f"'max_prompt_length' ({flat['max_prompt_length']}) must be smaller than 'max_length' "
            f"({flat['max_length']}) to leave room for the completions",
            where,
        )
    for key in ("bf16", "fp16"):
        if isinstance(flat[key], str) and flat[key] != "auto":
            raise PreftuneError(f"'{key}' must be true, false or auto, got {flat[key]!r}", where)
    if flat["bf16"] is True and flat["fp16"] is True:
        raise PreftuneError("set at most one of 'bf16' and 'fp16'", where)
    if flat["num_train_epochs"] == 0 and flat["max_steps"] <= 0:
        raise PreftuneError("set 'num_train_epochs' > 0 or 'max_steps' > 0", where)
    from preftune import losses

    try:
        params = losses.LossParams(beta=cfg.loss.beta, label_smoothing=cfg.loss.label_smoothing)
        losses.check_params(cfg.loss_types, cfg.loss.loss_weights, params)
    except PreftuneError as e:
        raise PreftuneError(str(e), where) from None
    if cfg.data.train_file is None and cfg.data.dataset is None:
        raise PreftuneError("no training data: set 'train_file' (or LLaMA-Factory 'dataset' + 'dataset_dir')", where)
    if cfg.data.train_file is not None and cfg.data.dataset is not None:
        raise PreftuneError("set either 'train_file' or 'dataset', not both", where)
    if cfg.data.eval_file is not None and flat["eval_split"] > 0:
        raise PreftuneError("set either 'eval_file' or 'eval_split', not both", where)


def from_dict(raw: dict[str, Any], where: str | None = None, base_dir: Path | None = None) -> TrainConfig:
    """Build and validate a config from flat keys (preftune, TRL or LLaMA-Factory names)."""
    if not isinstance(raw, dict):
        raise PreftuneError("the config must be a mapping of keys to values", where)
    ignored = {key: True for key in raw if isinstance(key, str) and key in IGNORED_KEYS}
    raw = translate_config_keys(raw, where)
    known = all_fields()
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in raw.items():
        if key not in known:
            raise _unknown_key(key, where)
        section, f = known[key]
        sections[section][key] = coerce(key, value, f.type if not isinstance(f.type, str) else _resolve(f), where)
    target = sections["model"].get("lora_target")
    if isinstance(target, str) and target != "all":
        # LLaMA-Factory writes module lists as "q_proj,v_proj"
        sections["model"]["lora_target"] = [t.strip() for t in target.split(",") if t.strip()]
    # relative paths: from the YAML's directory (or the working directory), saved absolute
    base_dir = base_dir if base_dir is not None else Path.cwd()
    _resolve_paths(sections, base_dir)
    cfg = TrainConfig(**{name: SECTIONS[name](**values) for name, values in sections.items()})
    cfg.base_dir = str(base_dir)
    _validate(cfg, where)
    if os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 speaks for all
        for line in ignored_key_warnings(ignored):
            print(f"warning: {line}", file=sys.stderr)
    return cfg


_HINTS_CACHE: dict[type, dict[str, Any]] = {}


def _resolve(f) -> Any:
    for cls in SECTIONS.values():
        hints = _HINTS_CACHE.setdefault(cls, typing.get_type_hints(cls))
        if f.name in hints:
            return hints[f.name]
    raise KeyError(f.name)


PATH_KEYS = ("train_file", "eval_file", "dataset_dir", "eval_prompts", "retain_prompts")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long for the file system: the reader names the problem
        return False


def _expand_home(value: Any) -> Any:
    return str(Path(value).expanduser()) if isinstance(value, str) and value.startswith("~") else value


def _resolve_paths(sections: dict[str, dict[str, Any]], base_dir: Path) -> None:
    """Relative data paths in a YAML file are relative to the file's directory when they exist there;
    ``~`` is the user's home in every path."""
    data = sections["data"]
    data.setdefault("dataset_dir", DataConfig.dataset_dir)
    for key in PATH_KEYS:
        value = _expand_home(data.get(key))
        if isinstance(value, str) and not Path(value).is_absolute():
            value = str(Path(value).resolve() if _exists(Path(value)) else base_dir / value)
        if key in data:
            data[key] = value
    model = sections["model"]
    for key in ("model_name_or_path", "ref_model_name_or_path"):
        value = _expand_home(model.get(key))
        if isinstance(value, str) and (value.startswith("./") or value.startswith("../")):
            candidate = base_dir / value
            if not _exists(Path(value)) and _exists(candidate):
                value = str(candidate)
        if key in model:
            model[key] = value
    training = sections["training"]
    for key in ("output_dir", "resume_from_checkpoint"):
        if key in training:
            training[key] = _expand_home(training[key])


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    try:
        is_dir, is_file = path.is_dir(), path.is_file()
    except (OSError, ValueError) as e:
        raise PreftuneError(f"cannot read the config file ({getattr(e, 'strerror', None) or e})", str(path)) from None
    if is_dir:
        raise PreftuneError("is a directory; give the YAML config file (preftune train CONFIG.yaml)", str(path))
    if not is_file:
        hint = ""
        if "=" in path.name:
            hint = (" (it looks like a key=value override; the config file comes first: "
                    "preftune train CONFIG [KEY=VALUE ...])")
        raise PreftuneError(f"config file not found: {path}{hint}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PreftuneError("config is not valid UTF-8", str(path)) from None
    except OSError as e:
        raise PreftuneError(f"cannot read the config file ({e.strerror or e})", str(path)) from None
    raw = load_yaml_value(text, str(path))
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise PreftuneError("the config must be a mapping of keys to values", str(path))
    return raw


def load_config(
    source: str | Path | dict | TrainConfig, overrides: list[str] | dict[str, Any] | None = None
) -> TrainConfig:
    """A config from a YAML path, a flat dict or a TrainConfig, with ``key=value`` overrides applied."""
    if isinstance(source, TrainConfig):
        raw, where = source.to_flat(), None
        base_dir = Path(source.base_dir) if source.base_dir else None
    elif isinstance(source, dict):
        raw, where, base_dir = dict(source), None, None
    else:
        source = Path(source).expanduser()
        raw, where, base_dir = read_yaml(source), str(source), source.resolve().parent
    if overrides:
        items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides)
        for key, value in items:
            raw[key] = value
    return from_dict(raw, where, base_dir)


def describe_keys() -> str:
    """Every key with its default and doc, for ``preftune train --help``."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section.upper()} KEYS")
        for f in fields(cls):
            default = f.default if f.default is not MISSING else None
            lines.append(f"  {f.name} (default {default!r}): {f.metadata['doc']}")
    lines.append("LLaMA-Factory keys: " + ", ".join(f"{k} -> {v}" for k, v in LLAMAFACTORY_ALIASES.items()))
    lines.append("  pref_ftx -> adds 'sft' to loss_type with that weight; stage must be dpo.")
    return "\n".join(lines)
