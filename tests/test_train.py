"""The training loop: accumulation, determinism, resume, metrics."""

import json
import signal

import pytest
import torch
from torch import nn
from safetensors.torch import load_file

from preftune import train

PROMPTS = ["What is the capital of Spain?", "The cat sat on", "Water boils at", "Hello, how are you?",
           "Paris is the capital of", "The quick brown fox", "I think you are right.", "numbers 1 2 3"]  # fmt: skip
TRAIN_KEYS = ["loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
              "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "epoch", "step"]  # fmt: skip


def write_pairs(path, n=8):
    rows = []
    for i in range(n):
        p = PROMPTS[i % len(PROMPTS)]
        rows.append({"prompt": p, "chosen": f"Madrid is the capital of Spain {i}.", "rejected": f"the dog {i}"})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def base_config(model_dir, tmp_path, **extra):
    return {
        "model_name_or_path": model_dir,
        "train_file": write_pairs(tmp_path / "pairs.jsonl"),
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "max_length": 64,
        "progress": False,
        "seed": 3,
        "bf16": False,  # the numbers below are fp32's, whatever bf16=auto would pick on this CPU
        **extra,
    }


def rows(out, key="loss"):
    history = json.loads((out / "log_history.json").read_text())
    return [r for r in history if key in r]


def close_rows(a, b, keys, tol=1e-5):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], abs=tol, rel=tol), (k, ra["step"], ra[k], rb[k])


def test_logged_metrics_have_trl_names(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    summary = train(base_config(tiny_model_dir, tmp_path, output_dir=str(out), max_steps=2, eval_split=0.25))
    train_rows = rows(out)
    assert len(train_rows) == 2
    for key in TRAIN_KEYS + ["tokens_per_second"]:
        assert key in train_rows[0]
    eval_rows = rows(out, "eval_loss")
    assert eval_rows and all("eval_" + k in eval_rows[-1] for k in TRAIN_KEYS[3:11])
    assert summary["pairs"]["train_used"] == 6 and summary["pairs"]["eval_used"] == 2
    first = train_rows[0]
    # at step 1 the policy equals the reference: rewards 0, loss log 2
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-6)
    assert first["loss"] == pytest.approx(0.693147, abs=1e-5)


def test_gradient_accumulation_equals_large_batch(tiny_model_dir, tmp_path):
    """4 pairs x 1 micro-batch == 2 x 2 == 1 x 4, for a pair-mean loss and a token-mean one (RPO)."""
    outs = []
    for bs, accum in [(4, 1), (2, 2), (1, 4)]:
        out = tmp_path / f"bs{bs}"
        cfg = base_config(tiny_model_dir, tmp_path, output_dir=str(out), finetuning_type="full", max_steps=3,
                          per_device_train_batch_size=bs, gradient_accumulation_steps=accum,
                          loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])  # fmt: skip
        train(cfg)
        outs.append(out)
    keys = ["loss", "grad_norm", "rewards/chosen", "rewards/margins", "logps/chosen", "logits/chosen"]
    close_rows(rows(outs[0]), rows(outs[1]), keys, tol=1e-5)
    close_rows(rows(outs[0]), rows(outs[2]), keys, tol=1e-5)
    w0 = load_file(outs[0] / "final" / "model.safetensors")
    w2 = load_file(outs[2] / "final" / "model.safetensors")
    assert all(torch.allclose(w0[k], w2[k], atol=1e-5) for k in w0)


def test_same_seed_same_metrics_other_seed_differs(tiny_model_dir, tmp_path):
    runs = {}
    for name, seed in [("a", 7), ("b", 7), ("c", 8)]:
        out = tmp_path / name
        train(base_config(tiny_model_dir, tmp_path, output_dir=str(out), max_steps=3, seed=seed, lora_dropout=0.1,
                          per_device_train_batch_size=2))  # fmt: skip
        runs[name] = rows(out)
    for ra, rb in zip(runs["a"], runs["b"]):
        assert {k: ra[k] for k in TRAIN_KEYS} == {k: rb[k] for k in TRAIN_KEYS}
    assert any(ra["loss"] != rc["loss"] for ra, rc in zip(runs["a"], runs["c"]))


@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_resume_continues_exactly(tiny_model_dir, tmp_path, finetuning_type):
    common = dict(max_steps=6, per_device_train_batch_size=2, lora_dropout=0.1, finetuning_type=finetuning_type,
                  warmup_steps=2, lr_scheduler_type="cosine", logging_steps=2)  # fmt: skip
    straight = tmp_path / "straight"
    train(base_config(tiny_model_dir, tmp_path, output_dir=str(straight), **common))
    interrupted = tmp_path / "interrupted"
    train(base_config(tiny_model_dir, tmp_path, output_dir=str(interrupted), save_steps=2, save_total_limit=2,
                      **common))  # fmt: skip
    ckpts = sorted(p.name for p in (interrupted / "checkpoints").iterdir())
    assert ckpts == ["step-4", "step-6"]  # 6: the end-of-run checkpoint; save_total_limit removed step-2
    train(base_config(tiny_model_dir, tmp_path, output_dir=str(interrupted), resume_from_checkpoint=str(
        interrupted / "checkpoints" / "step-4"), **common))  # fmt: skip
    resumed = rows(interrupted)
    assert [r["step"] for r in resumed] == [1, 2, 4, 6]
    close_rows(rows(straight), resumed, TRAIN_KEYS, tol=1e-6)


class _Payload:
    def __reduce__(self):  # what a crafted checkpoint would hold: a call run by pickle on load
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(_Payload.marker),))


def test_resume_never_runs_code_from_a_checkpoint(tiny_model_dir, tmp_path):
    """training_state.pt is loaded weights-only: a crafted pickle is refused with one line and its
    payload does not run; a truncated file is refused the same way."""
    out = tmp_path / "run"
    common = dict(max_steps=2, per_device_train_batch_size=2, save_steps=1)
    train(base_config(tiny_model_dir, tmp_path, output_dir=str(out), **common))
    ckpt = out / "checkpoints" / "step-1"
    state = torch.load(ckpt / "training_state.pt", weights_only=True)  # what we write loads weights-only
    assert set(state) == {"optimizer", "scheduler", "scaler", "rng"}
    _Payload.marker = str(tmp_path / "pwned")
    torch.save({**state, "extra": _Payload()}, ckpt / "training_state.pt")
    from preftune.errors import PreftuneError

    with pytest.raises(PreftuneError, match="cannot be loaded safely") as err:
        train(base_config(tiny_model_dir, tmp_path, output_dir=str(out), resume_from_checkpoint=str(ckpt), **common))
    assert not (tmp_path / "pwned").exists() and "\n" not in str(err.value)
    (ckpt / "training_state.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(PreftuneError, match="cannot be loaded safely"):
        train(base_config(tiny_model_dir, tmp_path, output_dir=str(out), resume_from_checkpoint=str(ckpt), **common))


def test_a_non_finite_loss_ends_in_one_line_and_keeps_what_ran(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The loss turns NaN at step 3: exit 1 with one line naming the step and the likely cause (no
    fp16 hint in fp32), the logs and summary of steps 1-2 written, their checkpoints kept, no final/."""
    import yaml

    from preftune import losses
    from tiny import run_main

    real, calls = losses.combined_loss, []

    def nan_at_step_3(*args, **kwargs):
        calls.append(1)
        per_pair = real(*args, **kwargs)
        return per_pair * float("nan") if len(calls) == 3 else per_pair

    monkeypatch.setattr(losses, "combined_loss", nan_at_step_3)
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(base_config(tiny_model_dir, tmp_path, output_dir=str(out), max_steps=6,
                                                 per_device_train_batch_size=8, save_steps=1)))  # fmt: skip
    code, _, err = run_main(monkeypatch, capsys, "train", config)
    lines = [line for line in err.strip().splitlines() if line.startswith("error")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: loss is nan at step 3: training diverged; lower learning_rate")
    assert "fp16" not in lines[0]
    assert [r["step"] for r in rows(out)] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["stopped_early"]["step"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert not (out / "final").exists()


def test_a_second_run_on_a_busy_output_dir_gets_one_line_naming_the_first(tiny_model_dir, tmp_path):
    """While one run holds output_dir, another one into it stops before writing, naming its pid;
    once the first is gone (its lock released), the directory is free again."""
    import os

    from preftune.errors import PreftuneError
    from preftune.training.state import lock_output_dir

    out = tmp_path / "run"
    out.mkdir()
    with lock_output_dir(out):
        with pytest.raises(PreftuneError, match=f"is in use by another preftune run \\(pid {os.getpid()}\\)"):
            train(base_config(tiny_model_dir, tmp_path, output_dir=str(out), max_steps=1))
        assert not (out / "config.yaml").exists()
    train(base_config(tiny_model_dir, tmp_path, output_dir=str(out), max_steps=1))
    assert (out / "summary.json").exists()


def test_save_total_limit_prunes(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    train(base_config(tiny_model_dir, tmp_path, output_dir=str(out), max_steps=7, per_device_train_batch_size=1,
                      save_steps=2, save_total_limit=2))  # fmt: skip
    # step 7 is the end-of-run checkpoint (kept: checkpoints were asked for), counted by save_total_limit
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-6", "step-7"]


def test_a_kill_while_writing_the_results_is_finished_by_a_rerun(tiny_model_dir, tmp_path, monkeypatch):
    """The last step is checkpointed before final/ and the reports: a run killed while writing them
    (here: in save_final) is finished by running the same command again, with the same rows; with
    no save_steps that checkpoint is removed once the results are written."""
    import preftune.training.finish as finish

    common = dict(max_steps=4, per_device_train_batch_size=2, eval_split=0.25)
    straight = tmp_path / "straight"
    train(base_config(tiny_model_dir, tmp_path, output_dir=str(straight), **common))
    assert not (straight / "checkpoints").exists()
    out = tmp_path / "killed"

    def killed(*args, **kwargs):
        raise SystemExit(137)

    with monkeypatch.context() as m:
        m.setattr(finish, "save_final", killed)
        with pytest.raises(SystemExit):
            train(base_config(tiny_model_dir, tmp_path, output_dir=str(out), **common))
    assert (out / "checkpoints" / "step-4").is_dir() and not (out / "summary.json").exists()
    train(base_config(tiny_model_dir, tmp_path, output_dir=str(out), **common))  # the same command again
    assert (out / "final").is_dir() and not (out / "checkpoints").exists()
    ours, theirs = (json.loads((d / "log_history.json").read_text()) for d in (out, straight))
    drop = ("tokens_per_second",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in ours] == [
        {k: v for k, v in r.items() if k not in drop} for r in theirs]


def test_overwrite_removes_the_previous_run_first(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    common = dict(per_device_train_batch_size=2, save_steps=1)
    train(base_config(tiny_model_dir, tmp_path, output_dir=str(out), max_steps=3, finetuning_type="lora",
                      eval_split=0.25, **common))  # fmt: skip
    assert (out / "adapter").is_dir() and (out / "eval.json").exists()
    train(base_config(tiny_model_dir, tmp_path, output_dir=str(out), max_steps=2, finetuning_type="full",
                      overwrite_output_dir=True, **common))  # fmt: skip
    assert not (out / "adapter").exists() and not (out / "eval.json").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert not list(out.glob(".previous-run-*"))


def test_a_fresh_run_does_not_mix_with_an_earlier_runs_checkpoints(tiny_model_dir, tmp_path, monkeypatch):
    """Stopped with checkpoints, then run again without resume or overwrite: refused in one line
    (before, the new run's checkpoints were pruned in favour of the old ones)."""
    from preftune.errors import PreftuneError, RunStopped
    from test_signals import signal_after_step

    out = tmp_path / "run"
    common = dict(per_device_train_batch_size=2, save_steps=1, max_steps=4)
    with monkeypatch.context() as m:
        signal_after_step(m, 2, signal.SIGTERM)
        with pytest.raises(RunStopped):
            train(base_config(tiny_model_dir, tmp_path, output_dir=str(out), **common))
    with pytest.raises(PreftuneError, match="holds checkpoints of an earlier run; continue it with resume"):
        train(base_config(tiny_model_dir, tmp_path, output_dir=str(out), **common))


def test_overwrite_removes_only_run_outputs_and_never_an_input(tiny_model_dir, tmp_path):
    from preftune.errors import PreftuneError

    out = tmp_path / "run"
    common = dict(per_device_train_batch_size=2, max_steps=1)
    train(base_config(tiny_model_dir, tmp_path, output_dir=str(out), **common))
    (out / "data.jsonl").write_text((tmp_path / "pairs.jsonl").read_text())  # e.g. a generate step's output
    cfg = base_config(tiny_model_dir, tmp_path, output_dir=str(out), overwrite_output_dir=True, **common)
    cfg["train_file"] = str(out / "data.jsonl")
    train(cfg)
    assert (out / "data.jsonl").exists() and (out / "summary.json").exists()
    # iterative DPO: training from the previous run's final/ into the same output_dir
    cfg = base_config(str(out / "final"), tmp_path, output_dir=str(out), overwrite_output_dir=True, **common)
    with pytest.raises(PreftuneError, match="would remove .*final', an input of this run"):
        train(cfg)
    assert (out / "final").is_dir()


def test_overwrite_never_removes_a_directory_that_is_not_a_run(tiny_model_dir, tmp_path):
    from preftune.errors import PreftuneError

    mine = tmp_path / "my_project"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(PreftuneError, match="holds files but no preftune run"):
        train(base_config(tiny_model_dir, tmp_path, output_dir=str(mine), max_steps=1, overwrite_output_dir=True))
    assert (mine / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("change, reason", [({"lora_r": 4}, "its lora is"), ({"n": 6}, "its training data is"),
                                            ({"finetuning_type": "full"}, "its finetuning_type is")])  # fmt: skip
def test_resume_refuses_a_checkpoint_of_another_run(tiny_model_dir, tmp_path, change, reason):
    from preftune.errors import PreftuneError

    out = tmp_path / "run"
    common = dict(per_device_train_batch_size=2, save_steps=1, max_steps=2)
    train(base_config(tiny_model_dir, tmp_path, output_dir=str(out), finetuning_type="lora", lora_r=8, **common))
    cfg = base_config(tiny_model_dir, tmp_path, output_dir=str(out), finetuning_type="lora", lora_r=8,
                      resume_from_checkpoint=str(out / "checkpoints" / "step-1"), **common)  # fmt: skip
    if "n" in change:
        cfg["train_file"] = write_pairs(tmp_path / "other.jsonl", n=change.pop("n"))
    cfg.update(change)
    with pytest.raises(PreftuneError, match=f"belongs to another run: {reason}"):
        train(cfg)


@pytest.mark.parametrize("output_dir, message", [("", "'output_dir' is empty"), ("{file}/run", "is a file"),
                                                 ("/proc/preftune-run", "cannot be created")])  # fmt: skip
def test_output_dir_is_checked_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch, output_dir, message):
    import preftune.training.loop as loop
    from preftune.errors import PreftuneError

    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(loop, "build_policy_and_reference", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(PreftuneError, match=message):
        train(base_config(tiny_model_dir, tmp_path, output_dir=output_dir.format(file=tmp_path / "file")))


def test_learning_rate_schedule_matches_transformers(tiny_model_dir, tmp_path):
    from transformers import get_scheduler

    out = tmp_path / "run"
    train(base_config(tiny_model_dir, tmp_path, output_dir=str(out), max_steps=5, per_device_train_batch_size=2,
                      warmup_ratio=0.4, lr_scheduler_type="cosine"))  # fmt: skip
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    sched = get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=5)
    expected = []
    for _ in range(5):
        expected.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert [r["learning_rate"] for r in rows(out)] == pytest.approx(expected)


def test_training_moves_the_margin(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    train(base_config(tiny_model_dir, tmp_path, output_dir=str(out), num_train_epochs=6, learning_rate=2e-2,
                      per_device_train_batch_size=4))  # fmt: skip
    history = rows(out)
    assert history[-1]["rewards/margins"] > 0.5
    assert history[-1]["rewards/accuracies"] == 1.0
    assert history[-1]["loss"] < history[0]["loss"] - 0.2


def test_reference_from_path_equals_frozen_copy(tiny_model_dir, tmp_path):
    common = dict(finetuning_type="full", max_steps=2, per_device_train_batch_size=4)
    copy_run = train(base_config(tiny_model_dir, tmp_path, output_dir=str(tmp_path / "copy"), **common))
    path_run = train(base_config(tiny_model_dir, tmp_path, output_dir=str(tmp_path / "path"),
                                 ref_model_name_or_path=tiny_model_dir, **common))  # fmt: skip
    for key in ("loss", "rewards/margins", "grad_norm"):
        assert path_run["final_metrics"][key] == pytest.approx(copy_run["final_metrics"][key], abs=1e-6)


def test_lora_target_list_adapts_only_those_modules(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    train(base_config(tiny_model_dir, tmp_path, output_dir=str(out), max_steps=1, lora_target=["q_proj", "v_proj"]))
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    modules = {name.split(".")[-3] for name in adapter}
    assert modules == {"q_proj", "v_proj"}


def test_heap_trimmer_trims_only_after_the_slack(monkeypatch):
    """Post-step RSS 1000, 1100, 1300 (> 1000 + 256: trim), then a new floor 1050, 1200: one trim."""
    import preftune.memory.heap as heap

    calls = []
    monkeypatch.setattr(heap, "_malloc_trim", lambda pad: calls.append(pad))
    values = iter([1000.0, 1100.0, 1300.0, 1050.0, 1200.0])
    monkeypatch.setattr(heap, "current_rss_mb", lambda: next(values))
    trimmer = heap.HeapTrimmer(slack_mb=256)
    for _ in range(5):
        trimmer.after_step()
    assert calls == [0] and trimmer.trims == 1


@pytest.mark.parametrize("accumulation,checkpointing,max_grad_norm",
                         [(1, False, 0.5), (2, False, 0.5), (1, "selective", 0.5), (2, True, 0.5), (1, False, 1e6)])
def test_bf16_weight_grads_same_run(tiny_model_dir, tmp_path, accumulation, checkpointing, max_grad_norm):
    """Full fine-tuning under bf16 autocast with Linear weight gradients held in bf16 (straight
    from HeldGradLinear's backward, added in fp32 under accumulation) logs the same metrics and
    ends in the same weights, bit for bit, as fp32 gradients with clip_grad_norm_ and one
    optimizer step, with and without checkpointing. max_grad_norm 0.5 is below the gradient
    norm, so the clip binds and its coefficient is exercised; 1e6 does not bind (no multiply)."""
    runs = {}
    for held in (False, True):
        out = tmp_path / f"held{held}"
        cfg = base_config(tiny_model_dir, tmp_path, output_dir=str(out), finetuning_type="full", bf16=True,
                          max_steps=3, per_device_train_batch_size=4 // accumulation,
                          gradient_accumulation_steps=accumulation, max_grad_norm=max_grad_norm,
                          gradient_checkpointing=checkpointing, bf16_weight_grads=held)  # fmt: skip
        runs[held] = (train(cfg), rows(out), load_file(out / "final" / "model.safetensors"))
    (plain_summary, plain_rows, plain_w), (summary, held_rows, held_w) = runs[False], runs[True]
    assert "bf16_weight_grads" not in plain_summary
    # 2 layers x 7 projections; the LM head of the tiny model is its own Linear, also held;
    # all of them are bias-free nn.Linear, so all run as HeldGradLinear
    assert summary["bf16_weight_grads"] == {"weights": 15, "kept_fp32": 0, "held_directly": 15}
    assert all((r["grad_norm"] > max_grad_norm) == (max_grad_norm == 0.5) for r in plain_rows)
    keys = [k for k in plain_rows[0] if k not in ("tokens_per_second",)]
    assert [{k: r[k] for k in keys} for r in plain_rows] == [{k: r[k] for k in keys} for r in held_rows]
    assert plain_w.keys() == held_w.keys()
    assert all(torch.equal(plain_w[k], held_w[k]) for k in plain_w)


def test_bf16_weight_grads_fall_back_to_fp32_for_inexact(tiny_model_dir):
    """A weight whose gradient is not a bf16 number (its layer ran outside autocast) keeps fp32."""
    from preftune.config import ModelConfig
    from preftune.modeling import load_causal_lm
    from preftune.training import Bf16WeightGrads

    model = load_causal_lm(tiny_model_dir, ModelConfig(), torch.float32, torch.device("cpu"))
    held = Bf16WeightGrads(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    model(input_ids=ids).logits.float().pow(2).mean().backward()  # fp32 throughout
    assert len(held.grads) == 15 and len(held.fp32_only) == 15
    assert all(g.dtype == torch.float32 for g in held.grads.values())
    assert all(p.grad is None for p in held.grads)


def test_row_length_multiple_default_follows_precision_and_device():
    """Rows are rounded to 8 tokens only under low-precision autocast on CPU (where torch's bf16
    attention backward keeps kernels per row length); a configured value always wins; 0 is an error."""
    from preftune.config import load_config
    from preftune.errors import PreftuneError
    from preftune.hardware import CpuInfo
    from preftune.memory import resolve_precision
    from preftune.training import row_length_multiple

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    base = {"train_file": "x.jsonl"}
    assert row_length_multiple(load_config(base, ["bf16=false"]), cpu) == 1
    assert row_length_multiple(load_config(base, ["bf16=true"]), cpu) == 8
    assert row_length_multiple(load_config(base, ["fp16=true"]), cpu) == 8
    assert row_length_multiple(load_config(base, ["bf16=true"]), cuda) == 1
    assert row_length_multiple(load_config(base, ["bf16=true", "row_length_multiple=1"]), cpu) == 1
    assert row_length_multiple(load_config(base, ["row_length_multiple=16"]), cuda) == 16
    with pytest.raises(PreftuneError, match="row_length_multiple"):
        load_config(base, ["row_length_multiple=0"])
    # bf16=auto (the default) follows the CPU: native bf16 -> bf16 autocast -> 8; without -> fp32 -> 1
    avx2, amx = CpuInfo("AVX2 CPU", frozenset({"avx2"})), CpuInfo("AMX CPU", frozenset({"avx2", "amx_bf16"}))
    assert row_length_multiple(resolve_precision(load_config(base), cpu, avx2)[0], cpu) == 1
    assert row_length_multiple(resolve_precision(load_config(base), cpu, amx)[0], cpu) == 8
    with pytest.raises(ValueError, match="resolve_precision"):
        row_length_multiple(load_config(base), cpu)  # "auto" is never read as a truthy string


@pytest.mark.parametrize("in_features,out_features", [(576, 1536), (1536, 576)])
def test_held_grad_linear_same_bits_at_model_sizes(in_features, out_features):
    """At SmolLM2-135M's MLP sizes (blocked matmuls, where the order of a sum shows in the bits),
    HeldGradLinear's output, input gradient and held bf16 weight gradient equal autocast's linear
    and autograd's backward (with the weight cast again, as in training) bit for bit."""
    from preftune.training import HeldGradLinear, recast_saved_weight_casts

    class Holder:
        def add(self, param, grad, exact):
            self.param, self.grad, self.exact = param, grad, exact

    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(out_features, in_features) * 0.02)
    x = torch.randn(3, 101, in_features, requires_grad=True)
    g = torch.randn(3, 101, out_features).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False), recast_saved_weight_casts():
        out = torch.nn.functional.linear(x, weight)
    out.backward(g)
    plain_out, plain_x_grad, plain_w_grad = out.detach(), x.grad, weight.grad
    x.grad = weight.grad = None

    holder = Holder()
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False), recast_saved_weight_casts():
        out = HeldGradLinear.apply(x, weight, holder)
    out.backward(g)
    assert torch.equal(out.detach(), plain_out)
    assert torch.equal(x.grad, plain_x_grad) and x.grad.dtype == torch.float32
    assert holder.param is weight and holder.exact and holder.grad.dtype == torch.bfloat16
    assert weight.grad is None
    assert torch.equal(holder.grad.float(), plain_w_grad)


def test_template_none_keeps_the_original_chat_template_in_final(tiny_model_dir, tmp_path):
    """``template: none`` trains on plain text, but final/ (and adapter/) keep the model's own chat
    template: the trained model still chats as before."""
    from transformers import AutoTokenizer

    original = AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    assert original
    out = tmp_path / "run"
    train(base_config(tiny_model_dir, tmp_path, output_dir=str(out), max_steps=1, template="none"))
    for saved in ("final", "adapter"):
        assert AutoTokenizer.from_pretrained(out / saved).chat_template == original, saved


def test_schedule_is_lazy_and_equals_the_eager_one():
    """Steps are built when asked; they equal the eager construction (each epoch's permutation
    seeded by seed + epoch, cut into micro-batches, grouped by gradient_accumulation_steps)."""
    import itertools
    import math
    import time

    from preftune.config import from_dict
    from preftune.training.state import build_schedule

    def eager(n, b, ga, seed, total):
        steps, epoch = [], 0
        while len(steps) < total:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
            micro = [order[i : i + b] for i in range(0, n, b)]
            steps += [micro[i : i + ga] for i in range(0, len(micro), ga)]
            epoch += 1
        return steps[:total]

    for n, b, ga, epochs in itertools.product([1, 9, 17], [1, 3, 4], [1, 2, 3], [1, 2.5]):
        cfg = from_dict({"model_name_or_path": "m", "train_file": "t.jsonl", "per_device_train_batch_size": b,
                         "gradient_accumulation_steps": ga, "num_train_epochs": epochs, "seed": 5})  # fmt: skip
        schedule, per_epoch = build_schedule(n, cfg)
        assert per_epoch == math.ceil(math.ceil(n / b) / ga)
        assert list(schedule) == eager(n, b, ga, 5, len(schedule))
    started = time.time()
    cfg = from_dict({"model_name_or_path": "m", "train_file": "t.jsonl", "max_steps": 10**9})
    schedule, _ = build_schedule(1000, cfg)
    last_epoch = (10**9 - 1) // 250  # 1000 pairs / batch 4 = 250 steps per epoch; the last step is its 250th
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(42 + last_epoch)).tolist()
    assert len(schedule) == 10**9 and schedule[10**9 - 1] == [order[996:1000]]
    assert time.time() - started < 1.0


def test_a_recipe_may_not_write_outside_or_run_code(tmp_path):
    """A `generate:` line from a file: written paths stay under the recipe's directory (output_dir is
    named by the same file, so it is no limit), and `--reward module:function` needs --allow-code."""
    from preftune.errors import PreftuneError
    from preftune.training.prepare import check_generate_step

    base = tmp_path / "recipe"
    ok = ["template", "--spec", "s.yaml", "--output", "data/train.jsonl", "--heldout-prompts", f"{base}/p.txt"]
    check_generate_step(ok, base, allow_code=False)
    for bad in (["--output", "../elsewhere/notes.txt"], ["--heldout-prompts=/etc/motd"],
                ["--heldout-output", "~/x.jsonl"], ["--heldout-prompts", "../../.bashrc"]):  # fmt: skip
        with pytest.raises(PreftuneError, match="writes outside the recipe's directory"):
            check_generate_step(["template", *bad], base, allow_code=False)
    for reward in ("score.py:score", "length.py:score", "lengthy:f", "os:system"):
        code = ["best-of-n", "--reward", reward, "--output", "pairs.jsonl"]
        with pytest.raises(PreftuneError, match="runs Python code named in the recipe; pass --allow-code"):
            check_generate_step(code, base, allow_code=False)
        check_generate_step(code, base, allow_code=True)
    for reward in ("length", "-length", "keyword:a,b", "regex:^Yes"):
        check_generate_step(["best-of-n", "--reward", reward, "--output", "p.jsonl"], base, allow_code=False)


def test_trust_remote_code_from_a_file_needs_allow_code(tiny_model_dir, tmp_path, monkeypatch):
    import preftune.training.loop as loop
    from preftune.errors import PreftuneError

    cfg = base_config(tiny_model_dir, tmp_path, output_dir=str(tmp_path / "run"), trust_remote_code=True)
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    with pytest.raises(PreftuneError, match="trust_remote_code: true in a config file.*--allow-code"):
        train(path)
    assert not (tmp_path / "run").exists()
    ran = []
    monkeypatch.setattr(loop, "run_training", lambda cfg, cleanup, allow_code: ran.append(allow_code))
    train(path, allow_code=True)
    train(path, ["trust_remote_code=true"])  # said on the command line
    train(cfg)  # a dict from Python: the caller's own code
    assert ran == [True, False, False]


def test_report_to_tensorboard_writes_every_logged_scalar(tiny_model_dir, tmp_path):
    from preftune.tensorboard_log import read_events, scalar_tag

    out = tmp_path / "run"
    train(base_config(tiny_model_dir, tmp_path, output_dir=str(out), max_steps=3, per_device_train_batch_size=2,
                      eval_split=0.25, eval_steps=2, report_to="tensorboard"))  # fmt: skip
    files = list((out / "runs").rglob("*tfevents*"))
    assert len(files) == 1
    scalars: dict[tuple[int, str], float] = {}
    for event in read_events(files[0]):
        for tag, value in (event.get("scalars") or {}).items():
            scalars[(event["step"], tag)] = value
    history = json.loads((out / "log_history.json").read_text())
    logged = [(r["step"], k, v) for r in history if "loss" in r or "eval_loss" in r
              for k, v in r.items() if k not in ("step", "epoch") and isinstance(v, float)]  # fmt: skip
    assert logged and len(logged) >= 3 * 10
    for step, key, value in logged:  # simple_value is a float32
        assert scalars[(step, scalar_tag(key))] == pytest.approx(value, rel=1e-6, abs=1e-12), (step, key)
