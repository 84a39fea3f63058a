"""Model loading helpers: compacted frozen LoRA weights are a fast path with twins here."""

import contextlib
import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from preftune import train
from preftune.config import ModelConfig
from preftune.forward import forward_fast
from preftune.memory.compaction import compact_frozen_linears, restore_frozen_linears
from preftune.modeling import load_causal_lm
from preftune.types import TokenizedPair


def lora_model(model_dir):
    model = load_causal_lm(model_dir, ModelConfig(), torch.float32, torch.device("cpu"))
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero in PEFT: give the adapter something to do
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return peft.train()


PAIRS = [TokenizedPair([5, 6, 7, 8], [9, 10, 11], [12, 13]), TokenizedPair([14, 15], [16, 17, 18, 19], [20])]


def logps_and_grads(model):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = forward_fast(model, PAIRS, pad_token_id=0)
    (out.chosen.logps.sum() - 0.5 * out.rejected.logps.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return torch.cat([out.chosen.logps, out.rejected.logps]).detach(), grads


def test_compacted_frozen_linears_equal_fp32_under_autocast(tiny_model_dir):
    """Autocast casts each Linear weight to bf16 before the matmul, so storing the frozen ones
    in bf16 must give the same log-probs and LoRA gradients, bit for bit."""
    plain = lora_model(tiny_model_dir)
    compact = copy.deepcopy(plain)
    names = compact_frozen_linears(compact, torch.bfloat16)
    # all frozen Linears but the (untied here) LM head: 2 layers x 7 projections
    assert len(names) == 14 and all("lm_head" not in n for n in names)
    base = compact.get_base_model().model.layers[0]
    assert base.self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16  # LoRA-wrapped
    assert base.self_attn.k_proj.weight.dtype == torch.bfloat16  # not a LoRA target, frozen all the same
    assert base.self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32  # trained: untouched
    a_logps, a_grads = logps_and_grads(plain)
    b_logps, b_grads = logps_and_grads(compact)
    assert torch.equal(a_logps, b_logps)
    assert a_grads.keys() == b_grads.keys() and len(a_grads) == 12
    for name in a_grads:
        assert torch.equal(a_grads[name], b_grads[name]), name


@pytest.mark.parametrize("source", ["safetensors", "reload"])
def test_restore_puts_back_the_fp32_weights(tiny_model_dir, monkeypatch, source):
    if source == "reload":  # model files that are not plain safetensors: the whole model is loaded again
        monkeypatch.setattr("preftune.memory.compaction._read_safetensors", lambda *a: None)
    plain = lora_model(tiny_model_dir)
    compact = copy.deepcopy(plain)
    names = compact_frozen_linears(compact, torch.bfloat16)
    q = compact.get_base_model().model.layers[1].self_attn.q_proj.base_layer.weight
    original = plain.get_base_model().model.layers[1].self_attn.q_proj.base_layer.weight
    assert not torch.equal(q.float(), original)  # bf16 lost bits: the restore has something to do
    restore_frozen_linears(compact, names, tiny_model_dir, ModelConfig())
    for (name, a), (_, b) in zip(plain.named_parameters(), compact.named_parameters()):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b), name
    merged_a = plain.merge_and_unload().state_dict()
    merged_b = compact.merge_and_unload().state_dict()
    assert all(torch.equal(merged_a[k], merged_b[k]) for k in merged_a)


@pytest.mark.parametrize("guard", [False, True])
def test_bf16_lora_run_same_with_and_without_compaction(tiny_model_dir, tmp_path, guard):
    """The whole run (loss curve, guard, final/ merged from fp32 originals) is unchanged."""
    pairs = tmp_path / "pairs.jsonl"
    prompts = ["The cat sat on", "Water boils at", "Hello, how are you?"]
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": f"Madrid {i}.", "rejected": f"dog {i}"}) + "\n"
                             for i, p in enumerate(prompts * 3)))  # fmt: skip
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    common = dict(model_name_or_path=tiny_model_dir, train_file=str(pairs), bf16=True, max_steps=3, logging_steps=1,
                  learning_rate=1e-2, progress=False, per_device_train_batch_size=3, eval_split=0.2)  # fmt: skip
    if guard:
        common.update(eval_prompts=str(tmp_path / "prompts.txt"), eval_steps=1, guard_max_new_tokens=8,
                      eval_max_new_tokens=8, retain_prompts=str(tmp_path / "prompts.txt"))  # fmt: skip
    runs = {}
    for compact in (False, True):
        out = tmp_path / f"run-{compact}"
        summary = train({**common, "output_dir": str(out), "compact_frozen_weights": compact})
        assert summary["compacted_frozen_linears"] == (14 if compact else 0)
        runs[compact] = out
    history = [json.loads((runs[c] / "log_history.json").read_text()) for c in (False, True)]
    for row in history:
        for r in row:
            r.pop("tokens_per_second", None)
    assert history[0] == history[1]
    from safetensors.torch import load_file

    a, b = (load_file(runs[c] / "final" / "model.safetensors") for c in (False, True))
    assert all(v.dtype == torch.float32 for v in b.values())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if guard:
        eval_a, eval_b = (json.loads((runs[c] / "eval.json").read_text()) for c in (False, True))
        assert eval_a["generations"] == eval_b["generations"]
        assert any(r.get("guard/retain_logp_drop") is not None for r in history[1])


def test_recast_weight_casts_same_gradients_less_saved(tiny_model_dir, monkeypatch):
    """Full fine-tuning under bf16 autocast: backward recasting the fp32 weights instead of
    keeping their bf16 casts gives the same log-probs and gradients, bit for bit, and none of
    those casts is kept: every Linear weight (LM head included) is packed as a reference."""
    from preftune.config import TrainConfig
    from preftune.memory.autocast import _pack_weight_cast, _unpack_weight_cast, make_autocast, recast_saved_weight_casts

    recast_weights: list[torch.Tensor] = []

    def counting_pack(t):
        packed = _pack_weight_cast(t)
        if isinstance(packed, tuple):
            recast_weights.append(packed[0])
        return packed

    def run(hooks):
        model = load_causal_lm(tiny_model_dir, ModelConfig(), torch.float32, torch.device("cpu")).train()
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False), hooks:
            out = forward_fast(model, PAIRS, pad_token_id=0)
        (out.chosen.logps.sum() - 0.5 * out.rejected.logps.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return model, torch.cat([out.chosen.logps, out.rejected.logps]).detach(), grads

    _, plain_logps, plain_grads = run(contextlib.nullcontext())
    for hooks in (recast_saved_weight_casts(), torch.autograd.graph.saved_tensors_hooks(counting_pack, _unpack_weight_cast)):
        model, logps, grads = run(hooks)
        assert torch.equal(plain_logps, logps)
        assert plain_grads.keys() == grads.keys()
        for name in grads:
            assert torch.equal(plain_grads[name], grads[name]), name
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert {id(w) for w in recast_weights} == linear_weights  # 2 layers x 7 projections + the LM head
    recast_weights.clear()
    monkeypatch.setattr("preftune.memory.autocast._pack_weight_cast", counting_pack)
    cfg = TrainConfig()
    cfg.training.bf16 = True
    weight = torch.nn.Parameter(torch.randn(5, 4))
    with make_autocast(cfg, torch.device("cpu"))():  # the training autocast installs the hooks
        y = torch.nn.functional.linear(torch.randn(3, 4, requires_grad=True) * 2, weight)  # not a leaf
    assert y.dtype == torch.bfloat16 and len(recast_weights) == 1 and recast_weights[0] is weight


@pytest.mark.parametrize("finetuning", ["full", "lora"])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_selective_checkpointing_same_numbers(tiny_model_dir, monkeypatch, finetuning, precision):
    """gradient_checkpointing: selective (matmul and attention outputs kept, the ops between them
    rerun in backward) and full (whole layers rerun) give the log-probs and every gradient of a
    run without checkpointing, bit for bit, under the training autocast and in fp32. The policy
    really keeps the matmuls and attention and reruns the norms, casts and activation."""
    from preftune.config import TrainConfig
    from preftune.memory import checkpointing, make_autocast
    from preftune.modeling import build_policy_and_reference

    decisions: dict[str, set[str]] = {"save": set(), "recompute": set()}
    policy = checkpointing._selective_policy

    def recording_policy(ctx, op, *args, **kwargs):
        verdict = policy(ctx, op, *args, **kwargs)
        decisions["save" if verdict.name == "MUST_SAVE" else "recompute"].add(op.__name__.split(".")[0])
        return verdict

    monkeypatch.setattr(checkpointing, "_selective_policy", recording_policy)
    cfg = TrainConfig()
    cfg.training.bf16 = precision == "bf16"
    autocast = make_autocast(cfg, torch.device("cpu"))

    def run(mode):
        mcfg = ModelConfig(finetuning_type=finetuning, lora_r=4, lora_alpha=8, gradient_checkpointing=mode)
        torch.manual_seed(0)
        model, _ = build_policy_and_reference(mcfg, str(tiny_model_dir), torch.device("cpu"), need_reference=False)
        with torch.no_grad():  # B starts at zero in PEFT: give the adapter something to do
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        model.train()
        with autocast():
            out = forward_fast(model, PAIRS, pad_token_id=0)
        (out.chosen.logps.sum() - 0.5 * out.rejected.logps.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return torch.cat([out.chosen.logps, out.rejected.logps]).detach(), grads

    plain_logps, plain_grads = run(False)
    assert plain_grads and all(g.abs().sum() > 0 for g in plain_grads.values())
    for mode in ("full", "selective"):
        logps, grads = run(mode)
        assert torch.equal(plain_logps, logps), mode
        assert grads.keys() == plain_grads.keys()
        for name in grads:
            assert torch.equal(plain_grads[name], grads[name]), (mode, name)
    assert {"mm"} <= decisions["save"] and any("scaled_dot_product" in op for op in decisions["save"])
    assert {"rsqrt", "silu"} | ({"_to_copy"} if precision == "bf16" else set()) <= decisions["recompute"]


def test_gradient_checkpointing_modes_in_config():
    from preftune.config import from_dict
    from preftune.errors import PreftuneError

    base = {"train_file": "x.jsonl"}
    for value, mode in ((False, "none"), (True, "full"), ("full", "full"), ("selective", "selective")):
        assert from_dict({**base, "gradient_checkpointing": value}).model.checkpointing_mode == mode
    with pytest.raises(PreftuneError, match="did you mean 'selective'"):
        from_dict({**base, "gradient_checkpointing": "selectve"})


def test_own_weights_leaves_the_file_mapping(tiny_model_dir):
    """Full fine-tuning's policy is copied off the safetensors mapping it was loaded into (the
    first optimizer step would otherwise copy it page by page): same values, ties kept, and the
    file is no longer mapped into the process."""
    import gc
    from pathlib import Path

    from preftune.modeling import load_causal_lm, own_weights

    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux)")
    weights_file = str(Path(tiny_model_dir).resolve() / "model.safetensors")
    model = load_causal_lm(tiny_model_dir, ModelConfig(), torch.float32, torch.device("cpu"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert weights_file in maps.read_text()
    own_weights(model)
    gc.collect()
    assert weights_file not in maps.read_text()
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
