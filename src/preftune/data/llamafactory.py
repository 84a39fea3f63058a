"""LLaMA-Factory compatibility, in one place.

* Data: preference datasets described in ``dataset_dir/dataset_info.json`` (``ranking: true``,
  alpaca or sharegpt ``formatting``, ``columns`` and ``tags``), read with LLaMA-Factory's
  defaults.
* Config: LLaMA-Factory DPO YAML keys (``pref_beta``, ``pref_loss``, ``pref_ftx``,
  ``cutoff_len``, ...) translated to preftune's, and its training-launcher keys ignored.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from preftune.data.common import data_error, loads_strict, type_name
from preftune.data.formats import CANONICAL, SHAREGPT_TAGS, Spec, convert
from preftune.data.readers import check_not_csv, decode_text, is_save_to_disk_dir, read_bytes, read_file
from preftune.errors import PreftuneError, shown
from preftune.types import PreferencePair
from preftune.util import did_you_mean


# --------------------------------------------------------------------------- dataset_info.json


def _read_llamafactory_target(path: Path, label: str, fmt: str) -> list[tuple[str, Any]]:
    """LLaMA-Factory's file_name may be a file or a directory of data files."""
    if path.is_dir() and not is_save_to_disk_dir(path):
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise data_error("the directory has no data files", label)
        records: list[tuple[str, Any]] = []
        for file in files:
            check_not_csv(file, fmt, str(Path(label) / file.name))
            records += read_file(file, str(Path(label) / file.name))
        return records
    check_not_csv(path, fmt, label)
    return read_file(path, label)


def load_llamafactory(dataset: str, dataset_dir: str | Path) -> list[PreferencePair]:
    """Load LLaMA-Factory preference dataset(s) described in ``dataset_dir/dataset_info.json``.

    ``dataset`` is an entry name, or several separated by commas (concatenated in order).
    The entry needs ``"ranking": true`` and a local ``file_name`` (relative to
    ``dataset_dir``; a file or a directory of files).  ``formatting`` is ``alpaca``
    (default) or ``sharegpt``; ``columns`` and (sharegpt) ``tags`` rename fields with
    LLaMA-Factory's documented defaults: prompt=instruction, query=input,
    messages=conversations, chosen=chosen, rejected=rejected; system and history are read
    only when mapped in ``columns`` (as LLaMA-Factory does); tags from/value/human/gpt/system.
    """
    info_path = Path(dataset_dir).expanduser() / "dataset_info.json"
    info_label = str(Path(dataset_dir) / "dataset_info.json")
    names = [n.strip() for n in dataset.split(",") if n.strip()] if isinstance(dataset, str) else []
    if not names:
        raise data_error(f"no dataset name given (got {dataset!r})", info_label)
    if not info_path.is_file():
        raise data_error("file not found (dataset_dir must hold LLaMA-Factory's dataset_info.json)", info_label)
    text = decode_text(read_bytes(info_path, info_label), info_label)
    info = loads_strict(text, info_label)
    if not isinstance(info, dict):
        raise data_error(f"expected an object of dataset entries, got {type_name(info)}", info_label)

    pairs: list[PreferencePair] = []
    for name in names:
        if name not in info:
            entries = sorted(info)
            available = ", ".join(entries[:10]) + (f", ... ({len(entries)} in all)" if len(entries) > 10 else "")
            hint = did_you_mean(name, entries)
            raise data_error(f"no dataset named '{name}'{hint} (available: {available or 'none'})", info_label)
        spec, file_name = _llamafactory_spec(name, info[name], info_label)
        target = Path(dataset_dir).expanduser() / file_name
        records = _read_llamafactory_target(target, str(Path(dataset_dir) / file_name), spec.fmt)
        if not records:
            raise data_error("no preference pairs found (the file has no records)", str(Path(dataset_dir) / file_name))
        pairs += convert(records, spec)
    return pairs


_LF_COLUMNS = ("prompt", "query", "response", "history", "messages", "system", "chosen", "rejected")
_LF_UNSUPPORTED_COLUMNS = {
    "tools": "tool use",
    "images": "images",
    "videos": "videos",
    "audios": "audio",
    "kto_tag": "KTO (unpaired) labels",
}


def _llamafactory_spec(name: str, entry: Any, where: str) -> tuple[Spec, str]:
    what = f"dataset '{name}'"
    if not isinstance(entry, dict):
        raise data_error(f"{what} must be an object, got {type_name(entry)}", where)
    if entry.get("ranking") is not True:
        raise data_error(f"{what} is not a preference dataset (its entry needs \"ranking\": true)", where)
    file_name = entry.get("file_name")
    if file_name is None:
        for key in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name"):
            if key in entry:
                raise data_error(
                    f"{what} is loaded through '{key}'; preftune reads local files only: "
                    "download it and set file_name",
                    where,
                )
        raise data_error(f"{what} has no 'file_name'", where)
    if not isinstance(file_name, str) or not file_name:
        raise data_error(f"{what} 'file_name' must be a string, got {type_name(file_name)}", where)

    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        hint = did_you_mean(str(formatting), ["alpaca", "sharegpt"]) or " (use alpaca or sharegpt)"
        raise data_error(f"{what} has formatting '{formatting}'{hint}", where)

    columns = entry.get("columns") or {}
    if not isinstance(columns, dict):
        raise data_error(f"{what} 'columns' must be an object, got {type_name(columns)}", where)
    for key, value in columns.items():
        if key in _LF_UNSUPPORTED_COLUMNS:
            if value:
                raise data_error(f"{what} maps column '{key}': {_LF_UNSUPPORTED_COLUMNS[key]} is not supported", where)
            continue
        if key not in _LF_COLUMNS:
            raise data_error(f"{what} has unknown column '{key}'{did_you_mean(key, _LF_COLUMNS)}", where)
        if value is not None and (not isinstance(value, str) or not value):
            raise data_error(f"{what} column '{key}' must be a column name, got {type_name(value)}", where)

    names: dict[str, str | None] = {name_: None for name_ in CANONICAL}
    names["chosen"] = columns.get("chosen") or "chosen"
    names["rejected"] = columns.get("rejected") or "rejected"
    names["system"] = columns.get("system")  # LLaMA-Factory default: no system column
    if formatting == "alpaca":
        names["instruction"] = columns.get("prompt") or "instruction"
        names["input"] = columns.get("query") or "input"
        names["history"] = columns.get("history")  # LLaMA-Factory default: no history column
        fmt = "alpaca"
    else:
        names["conversations"] = columns.get("messages") or "conversations"
        fmt = "sharegpt"
    lf_to_canonical = {"prompt": "instruction", "query": "input", "messages": "conversations"}
    mapped = {lf_to_canonical.get(k, k): k for k, v in columns.items() if v and k in _LF_COLUMNS}

    tags = dict(SHAREGPT_TAGS)
    raw_tags = entry.get("tags") or {}
    if not isinstance(raw_tags, dict):
        raise data_error(f"{what} 'tags' must be an object, got {type_name(raw_tags)}", where)
    for key, value in raw_tags.items():
        if key not in tags:
            raise data_error(f"{what} has unknown tag '{key}'{did_you_mean(key, list(tags))}", where)
        if value is not None and not isinstance(value, str):
            raise data_error(f"{what} tag '{key}' must be a string, got {type_name(value)}", where)
        if value is None and key != "system_tag" and key not in ("observation_tag", "function_tag"):
            raise data_error(f"{what} tag '{key}' must be a string, got null", where)
        tags[key] = value
    return Spec(fmt, names, mapped=mapped, tags=tags), file_name


# --------------------------------------------------------------------------- config keys

# LLaMA-Factory key -> preftune key (values translated in translate_config_keys).
LLAMAFACTORY_ALIASES = {
    "pref_beta": "beta",
    "pref_loss": "loss_type",
    "cutoff_len": "max_length",
    "lora_rank": "lora_r",
    "val_size": "eval_split",
}
# Keys of LLaMA-Factory / HF TrainingArguments that carry no meaning here: accepted, and each one
# found prints one warning line at config load saying it has no effect (the reason says what does).
IGNORED_KEYS: dict[str, str] = {
    "do_train": "preftune train always trains",
    "do_eval": "evaluation runs whenever eval_file or eval_split is set",
    "overwrite_cache": "preftune keeps no dataset cache",
    "preprocessing_num_workers": "data is tokenized in the training process",
    "dataloader_num_workers": "batches are built in the training process",
    "plot_loss": "training_curves.png is always written",
    "eval_strategy": "evaluation follows eval_steps",
    "evaluation_strategy": "evaluation follows eval_steps",
    "save_strategy": "checkpoints follow save_steps",
    "logging_strategy": "logging follows logging_steps",
    "save_only_model": "checkpoints always hold what a resume needs",
    "flash_attn": "preftune chooses the attention implementation",
    "run_name": "runs are named by output_dir",
    "logging_dir": "logs go to output_dir (TensorBoard files to output_dir/runs with report_to: tensorboard)",
    "remove_unused_columns": "preftune reads only the columns it needs",
}


def ignored_key_warnings(raw: dict[str, Any]) -> list[str]:
    """One line per ignored key in ``raw``: it has no effect here, and what does."""
    return [f"'{key}' has no effect in preftune ({reason}); ignored" for key, reason in IGNORED_KEYS.items()
            if key in raw]  # fmt: skip


def _number(value: Any, key: str, where: str | None) -> float:
    """A finite number >= 0 (YAML reads ``5e-1``, without a dot, as a string: accepted)."""
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None:
        raise PreftuneError(f"'{key}' must be a number, got {type_name(value)}", where)
    try:
        number = float(number)
    except OverflowError:
        number = math.inf
    if not (math.isfinite(number) and number >= 0):
        raise PreftuneError(f"'{key}' must be a finite number >= 0", where)
    return number


def translate_config_keys(raw: dict[str, Any], where: str | None) -> dict[str, Any]:
    """Flat config keys with LLaMA-Factory's names and values turned into preftune's (others kept)."""
    out: dict[str, Any] = {}
    stage = raw.get("stage")
    if stage is not None and stage != "dpo":
        named = stage if isinstance(stage, str) and len(stage) <= 60 else shown(stage)
        raise PreftuneError(f"'stage: {named}' is not supported; preftune runs stage: dpo", where)
    pref_ftx = raw.get("pref_ftx")
    if pref_ftx is not None:
        pref_ftx = _number(pref_ftx, "pref_ftx", where)
    for key, value in raw.items():
        if key in ("stage", "pref_ftx") or key in IGNORED_KEYS:
            continue
        if key == "pref_loss" and value == "kto_pair":
            raise PreftuneError("pref_loss 'kto_pair' is not supported; use sigmoid, hinge, ipo, orpo or simpo", where)
        if key == "deepspeed":
            raise PreftuneError("'deepspeed' is not supported; under torchrun use 'distributed: fsdp' (FSDP2) to "
                                "shard the model, or 'distributed: ddp'", where)  # fmt: skip
        if key == "eval_dataset":
            raise PreftuneError("'eval_dataset' is not supported; use eval_file or val_size", where)
        out[LLAMAFACTORY_ALIASES.get(key, key)] = value
    if pref_ftx:
        # LLaMA-Factory: loss = preference loss + pref_ftx * SFT loss on chosen
        base = out.get("loss_type", "sigmoid")
        base = [base] if isinstance(base, str) else list(base)
        if "sft" not in base:
            out["loss_type"] = base + ["sft"]
            out["loss_weights"] = [1.0] * len(base) + [float(pref_ftx)]
    return out
