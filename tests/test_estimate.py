"""`preftune estimate`: the formula's parts against hand-worked numbers and against what autograd keeps,
the command's output for a shipped recipe and a 7B config.json, the fits decision and bad input."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny import run_main

from preftune import estimate as est

ROOT = Path(__file__).resolve().parents[1]
LLAMA_7B = ROOT / "tests" / "data" / "model_configs" / "llama-2-7b"

# A tiny Llama: h 64, 2 layers, intermediate 160, vocab 300, 4 heads of 16, 2 key/value heads, untied head.
TINY = est.ModelShape(hidden=64, layers=2, intermediate=160, vocab=300, heads=4, kv_heads=2, head_dim=16, tied=False,
                      source="test")  # fmt: skip
FP32_FULL = est.Setting(full=True, lora_r=16, lora_targets=est.LORA_ALL, amp=False, weight_bytes=4, ckpt="none",
                        reference="cached", dist="single", nproc=1, accumulation=1, cpu=False)  # fmt: skip
LORA = replace(FP32_FULL, full=False)


def test_parameter_counts_by_hand():
    """Per layer: q 64x64 = 4096, k and v 64x32 = 2048 each, o 4096, gate/up/down 64x160 = 10240 each:
    43008 in Linears, + 2 norms of 64 = 43136. Root: embedding and head 300x64 each + final norm 64 = 38464.
    Total 2 x 43136 + 38464 = 124736. LoRA r=16 on all seven: 16 x (128+96+96+128+224+224+224) = 17920 per
    layer, 35840 in all."""
    assert TINY.layer_linear_params == 43008
    assert TINY.layer_params == 43136
    assert TINY.root_params == 38464
    assert TINY.params == 124736
    assert est.lora_params(TINY, LORA) == 35840
    assert est.lora_params(TINY, replace(LORA, lora_targets=("q_proj", "v_proj"))) == 2 * 16 * (128 + 96)


def test_layer_activation_by_hand():
    """Bytes per token and layer for a row of 47 tokens (fp32, full fine-tuning): the two norms keep x and x/rms
    (16h = 1024), the q/k/v and gate/up inputs (8h = 512), attention q, repeated k, v and output (16h = 1024)
    + logsumexp (4 heads x 4 = 16) + a 47-wide fp32 mask row (188), SwiGLU's gate, up, product (12i = 1920), two
    rsqrt (8): 4692. LoRA: no x/rms (-512), + seven r=16 lora_A outputs (448): 4628. bf16, row of 48: norms
    1024, five bf16 input casts 640, attention 8h + 16 + 96 = 624, MLP 960, rsqrt 8: 3256."""
    assert est.layer_activation(TINY, FP32_FULL, 47) == 4692
    assert est.layer_activation(TINY, LORA, 47) == 4628
    assert est.layer_activation(TINY, replace(FP32_FULL, amp=True), 48) == 3256
    assert est.layer_activation(TINY, replace(LORA, amp=True), 48) == 3096  # LoRA's o_proj keeps its own cast
    # without the fused SwiGLU, silu(gate) is kept too: + 4 x 160
    assert est.layer_activation(TINY, replace(FP32_FULL, fused_swiglu=False), 47) == 4692 + 640


def test_model_states_ddp_and_fsdp_by_hand():
    """Full fine-tuning fp32, one process: weights 4 x 124736 = 498944 bytes, gradients the same, AdamW twice
    that. FSDP over 4 ranks divides all three by 4 and adds the unsharded root (38464 params at 4 bytes) and
    two gathered layers + one layer of fp32 gradients (43136 x (4+4+4)). DDP adds 2 x 32 MiB of bucket."""
    batch = est.Batch(rows=2, row_len=47, scored=54, how="")
    one = est.estimate(TINY, FP32_FULL, batch, batch)
    assert (one.weights, one.grads, one.optimizer) == (498944, 498944, 997888)
    fsdp = est.estimate(TINY, replace(FP32_FULL, dist="fsdp", nproc=4), batch, batch)
    assert (fsdp.weights, fsdp.grads, fsdp.optimizer) == (498944 / 4, 498944 / 4, 997888 / 4)
    runtime = est.CUDA_CONTEXT_MIB * est.MiB
    assert fsdp.other - runtime == 38464 * 4 + 43136 * 12
    ddp = est.estimate(TINY, replace(FP32_FULL, dist="ddp", nproc=4), batch, batch)
    assert ddp.other - runtime == 2 * est.DDP_BUCKET
    # bf16 autocast: Linear weight gradients held in bf16 (2 x 43008 Linear params x 2 bytes less)
    bf16 = est.estimate(TINY, replace(FP32_FULL, amp=True), batch, batch)
    assert bf16.grads == 498944 - 2 * 43008 * 2
    # FSDP checkpoints gather the whole weights and AdamW state on rank 0's host: 3 x 4 x 124736 bytes
    assert est.fsdp_gather(TINY, FP32_FULL) == 12 * 124736
    # a reference not cached: a second fp32 copy for the whole run
    held = est.estimate(TINY, replace(FP32_FULL, reference="on the fly"), batch, batch)
    assert held.weights == 2 * 498944 and held.peak == one.peak + 498944


def test_ddp_bucket_matches_preftune_distributed():
    distributed = pytest.importorskip("preftune.distributed")
    assert est.DDP_BUCKET == distributed.BUCKET_BYTES


def _saved_bytes(tmp_path: Path, layers: int, **keys) -> tuple[int, int]:
    """Bytes of the storages autograd keeps after one fast-path forward of a TINY-shaped Llama (parameters
    excluded), and the packed tokens; two pairs of 20 + 15 + 12 tokens, one row each."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import preftune.memory.autocast as autocast_mod
    from preftune.config import load_config
    from preftune.memory import MemoryPlan, make_autocast
    from preftune.modeling import build_policy_and_reference
    from preftune.training.prepare import make_forward
    from preftune.types import TokenizedPair

    path = tmp_path / f"m{layers}"
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    cfg = load_config({"train_file": "unused.jsonl", "model_name_or_path": str(path), "device": "cpu",
                       "short_row_attention": False, "row_length_multiple": 1, **keys})  # fmt: skip
    cpu = torch.device("cpu")
    model, reference = build_policy_and_reference(cfg.model, str(path), cpu, False)
    model.train()
    pairs = [TokenizedPair(list(range(1, 21)), list(range(30, 45)), list(range(50, 62))) for _ in range(2)]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def note(t):
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    pack_cast = autocast_mod._pack_weight_cast  # under autocast its hooks are the inner ones: note there too

    def both(t):
        out = pack_cast(t)
        if isinstance(out, torch.Tensor):
            note(out)
        return out

    with MemoryPlan.apply(cfg, model, reference, cpu, precompute_reference=True):
        autocast_mod._pack_weight_cast = both
        try:
            with torch.autograd.graph.saved_tensors_hooks(note, lambda t: t), make_autocast(cfg, cpu)():
                make_forward(cfg, 0, cpu)(model, pairs)
        finally:
            autocast_mod._pack_weight_cast = pack_cast
    return sum(kept.values()), 2 * 47


@pytest.mark.parametrize("keys, setting", [
    ({"finetuning_type": "full", "bf16": False}, FP32_FULL),
    ({"finetuning_type": "lora", "bf16": False}, LORA),
    ({"finetuning_type": "full", "bf16": True}, replace(FP32_FULL, amp=True)),
])  # fmt: skip
def test_layer_activation_is_what_autograd_keeps(tmp_path, keys, setting):
    """One decoder layer more adds exactly ``layer_activation`` bytes per token to what autograd keeps; the
    whole forward (rotary, final norm, head input, logits) is within 1% of ``activations``' kept part."""
    one, tokens = _saved_bytes(tmp_path, 1, **keys)
    two, _ = _saved_bytes(tmp_path, 2, **keys)
    assert two - one == est.layer_activation(TINY, setting, 47) * tokens
    kept, _ = est.activations(replace(TINY, layers=2), setting, est.Batch(rows=2, row_len=47, scored=2 * 27, how=""))
    assert kept == pytest.approx(two, rel=0.01)


def test_parse_memory():
    assert est.parse_memory("80GB") == 80 * 2**30
    assert est.parse_memory("24 GiB") == 24 * 2**30
    assert est.parse_memory("16000MB") == 16000 * 2**20
    assert est.parse_memory("1.5T") == int(1.5 * 2**40)
    for bad in ("80XB", "GB", "-1GB", "0GB", ""):
        with pytest.raises(est.PreftuneError, match="--device-memory"):
            est.parse_memory(bad)


def _fits(row: str) -> str:
    """The verdict of a table row: the word after the six numbers."""
    words = row.split()
    return words[max(i for i, word in enumerate(words) if re.fullmatch(r"[0-9.]+", word)) + 1]


def test_cli_shipped_recipes(monkeypatch, capsys, tmp_path):
    """Without a converted default model the published SmolLM2-135M shapes are used. A full fine-tuning recipe
    gets ddp and fsdp rows, with and without checkpointing, each with a verdict, its own row starred; a LoRA
    recipe gets the ddp rows and a line saying LoRA runs as ddp under fsdp."""
    monkeypatch.setenv("PREFTUNE_HOME", str(tmp_path))
    code, out, err = run_main(monkeypatch, capsys, "estimate", ROOT / "examples" / "toy.yaml")
    assert code == 0, err
    assert "0.135B parameters" in out and "published shapes" in out
    assert "bf16: auto, assumed a GPU with bf16" in out and "256 tokens per pair" in out  # 2 x max_length 128
    rows = [line for line in out.splitlines() if line[2:6] in ("ddp ", "fsdp")]
    assert [" ".join(row[2:36].split()) for row in rows] == [
        "ddp no checkpointing", "ddp checkpointing: full", "fsdp no checkpointing", "fsdp checkpointing: full"]
    assert all(_fits(row) == "yes" for row in rows) and rows[0].startswith("* ddp")
    code, out, err = run_main(monkeypatch, capsys, "estimate", ROOT / "examples" / "sycophancy.yaml")
    rows = [line for line in out.splitlines() if line[2:6] in ("ddp ", "fsdp")]
    assert code == 0 and len(rows) == 2 and "LoRA runs as ddp under distributed: fsdp" in out


def test_cli_7b_config_json_fits(monkeypatch, capsys):
    """Llama-2-7B full fine-tuning in bf16 on 8 x 80 GB: DDP holds 25 GiB of fp32 weights, 25 GiB of gradients
    (fp32 under torchrun) and 50 GiB of AdamW per GPU: no. FSDP over 8: yes (its peak is loading the whole
    policy and reference copy in fp32 on every rank before sharding: 50 GiB)."""
    code, out, err = run_main(monkeypatch, capsys, "estimate", LLAMA_7B, "finetuning_type=full", "bf16=true",
                              "per_device_train_batch_size=1", "--pair-tokens", "2048")  # fmt: skip
    assert code == 0, err
    assert "6.74B parameters" in out and "2048 tokens per pair" in out
    verdict = {" ".join(line[2:36].split()): _fits(line) for line in out.splitlines() if line[2:6] in ("ddp ", "fsdp")}
    assert verdict["ddp no checkpointing"] == "no" and verdict["ddp checkpointing: full"] == "no"
    assert verdict["fsdp checkpointing: full"] == "yes"
    # the same 7B with LoRA on one card: preftune loads the base in fp32 (4 x 6.74B = 25.1 GiB) before it
    # compacts the frozen Linears to bf16, so 24 GB is too small even with checkpointing; 32 GB fits both
    args = ("estimate", LLAMA_7B, "bf16=true", "per_device_train_batch_size=1", "--pair-tokens", "2048", "--nproc", "1")
    code, out, _ = run_main(monkeypatch, capsys, *args, "--device-memory", "24GB")
    rows = [line for line in out.splitlines() if line[2:11] == "1 process"]
    assert code == 0 and [_fits(row) for row in rows] == ["no", "no"] and "(peak: loading)" in rows[1]
    code, out, _ = run_main(monkeypatch, capsys, *args, "--device-memory", "32GB")
    assert [_fits(row) for row in out.splitlines() if row[2:11] == "1 process"] == ["yes", "yes"]


def test_cli_bad_device_memory_is_one_line(monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, "estimate", LLAMA_7B, "--device-memory", "80XB")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == ["error: --device-memory '80XB': give a size such as 80GB, 24GiB or 16000MB"]


def test_cli_model_without_config_json(monkeypatch, capsys, tmp_path):
    code, _, err = run_main(monkeypatch, capsys, "estimate", tmp_path)
    assert code == 2 and "no config.json" in err and len(err.strip().splitlines()) == 1


def test_data_batches_from_the_run(tiny_model_dir, tmp_path):
    """--data: the run's own micro-batches (tokenizer and data only) give smaller, exact rows than the worst case."""
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "What is the capital of Spain?", "chosen": "Madrid.", "rejected": "Paris is."}] * 4
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = est.load_config({"train_file": str(data), "model_name_or_path": tiny_model_dir, "max_length": 64,
                           "per_device_train_batch_size": 2})  # fmt: skip
    batches = est.data_batches(cfg, 1)
    assert len(batches) == 1 and batches[0].rows == 2 and batches[0].row_len < 2 * 64
    worst = est.worst_case_batch(cfg, None, 1)
    assert (worst.rows, worst.row_len) == (2, 128)
