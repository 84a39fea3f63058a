"""torchrun at 2 ranks (gloo, CPU) gives the numbers of one process at the same global batch.

Every test launches real processes: ``torchrun ... tests/dist_worker.py train CONFIG`` (the
preftune CLI, with a fault injected on request). One process with batch W·b is the reference:
metrics within 1e-5, final weights within 1e-4 (fp32; the ranks pack their pairs into other rows,
so float sums differ in the last bits).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from test_train import write_pairs

pytestmark = pytest.mark.distributed

WORKER = str(Path(__file__).parent / "dist_worker.py")
SKIP_KEYS = {"tokens_per_second", "epoch", "step"}


def config_file(tmp_path, model_dir, **extra) -> Path:
    train = write_pairs(tmp_path / "pairs.jsonl", n=9)  # 9 pairs: the last global micro-batch leaves a rank empty
    evals = write_pairs(tmp_path / "eval.jsonl", n=5)
    cfg = {"model_name_or_path": model_dir, "train_file": train, "eval_file": evals, "learning_rate": 1e-2,
           "logging_steps": 1, "max_length": 64, "progress": False, "seed": 3, "bf16": False,
           "num_train_epochs": 2, "per_device_eval_batch_size": 2, "eval_steps": 2, **extra}  # fmt: skip
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def env(**extra) -> dict:
    out = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    out.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1] / "src"), **extra)
    return out


def run_one(config: Path, out: Path, *overrides: str) -> None:
    cmd = [sys.executable, WORKER, "train", str(config), f"output_dir={out}", *overrides]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def torchrun(*args: str, extra_env=None, timeout=300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", *args]
    return subprocess.run(cmd, env=env(**(extra_env or {})), capture_output=True, text=True, timeout=timeout)


def run_two(config: Path, out: Path, *overrides: str, extra_env=None) -> subprocess.CompletedProcess:
    return torchrun("--standalone", "--nproc_per_node", "2", WORKER, "train", str(config), f"output_dir={out}",
                    *overrides, extra_env=extra_env)  # fmt: skip


def assert_same_run(one: Path, two: Path, metric_tol=1e-5, weight_tol=1e-4) -> None:
    a = json.loads((one / "log_history.json").read_text())
    b = json.loads((two / "log_history.json").read_text())
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b):
        assert ra.get("step") == rb.get("step")
        for key, value in ra.items():
            if key not in SKIP_KEYS and isinstance(value, (int, float)):
                assert rb[key] == pytest.approx(value, abs=metric_tol, rel=metric_tol), (ra["step"], key)
    wa = load_file(one / "final" / "model.safetensors")
    wb = load_file(two / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= weight_tol


@pytest.mark.parametrize(
    "finetuning_type, extra",
    [("full", {"gradient_accumulation_steps": 2, "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}),
     ("lora", {"max_grad_norm": 0.05})],  # the global norm is clipped (0.05: every step clips)
)  # fmt: skip
def test_two_ranks_equal_one_process(tiny_model_dir, tmp_path, finetuning_type, extra):
    config = config_file(tmp_path, tiny_model_dir, finetuning_type=finetuning_type, **extra)
    run_one(config, tmp_path / "one", "per_device_train_batch_size=4")
    proc = run_two(config, tmp_path / "two", "per_device_train_batch_size=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(tmp_path / "one", tmp_path / "two")
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["distributed"] == "ddp"
    assert proc.stdout.count("done:") == 1  # rank 0 speaks for both


def test_fsdp_full_equals_one_process_and_its_checkpoint_resumes_at_2_and_1_ranks(tmp_path):
    """FSDP2 (every layer and the root sharded over 2 ranks) on a model whose LM head is tied to the
    embedding (as SmolLM2's), gradient accumulation 2, an empty share in the last micro-batch of each
    epoch: the numbers of one process at batch 4. Its step-2 checkpoint (gathered whole by rank 0)
    resumes sharded at 2 ranks and in one process."""
    import tiny

    model_dir = tiny.save_tiny(tmp_path / "tied-model", tied=True)
    config = config_file(tmp_path, model_dir, finetuning_type="full", gradient_accumulation_steps=2,
                         save_steps=2)  # fmt: skip
    run_one(config, tmp_path / "one", "per_device_train_batch_size=4")
    proc = run_two(config, tmp_path / "two", "per_device_train_batch_size=2", "distributed=fsdp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fsdp: 2 decoder layers and the root sharded over 2 ranks" in proc.stderr
    assert_same_run(tmp_path / "one", tmp_path / "two")
    for name, launch in (("resumed2", "two"), ("resumed1", "one")):
        (tmp_path / name).mkdir()
        shutil.copytree(tmp_path / "two" / "checkpoints" / "step-2", tmp_path / name / "checkpoints" / "step-2")
    proc = run_two(config, tmp_path / "resumed2", "per_device_train_batch_size=2", "distributed=fsdp",
                   "resume_from_checkpoint=true")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_one(config, tmp_path / "resumed1", "per_device_train_batch_size=4", "resume_from_checkpoint=true")
    for name in ("resumed2", "resumed1"):
        assert_same_run(tmp_path / "one", tmp_path / name)


def test_two_nodes_on_localhost_equal_one_process(tiny_model_dir, tmp_path):
    """The README's multi-node command, as two one-process "nodes" meeting at localhost:PORT."""
    config = config_file(tmp_path, tiny_model_dir, finetuning_type="lora", num_train_epochs=1)
    run_one(config, tmp_path / "one", "per_device_train_batch_size=4")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    nodes = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node_rank), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}",
               "--rdzv_id", "preftune-test", WORKER, "train", str(config), f"output_dir={tmp_path / 'two'}",
               "per_device_train_batch_size=2"]  # fmt: skip
        nodes.append(subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    assert_same_run(tmp_path / "one", tmp_path / "two")


def test_an_error_on_one_rank_ends_every_rank(tiny_model_dir, tmp_path):
    config = config_file(tmp_path, tiny_model_dir, finetuning_type="lora", ddp_timeout=60)
    started = time.time()
    proc = run_two(config, tmp_path / "two", "per_device_train_batch_size=2", extra_env={"FAIL_ON_RANK": "1:2"})
    assert proc.returncode != 0
    assert time.time() - started < 60  # no hang: the others end long before ddp_timeout
    assert "RuntimeError: injected fault on rank 1 at step 2" in proc.stderr  # the root cause, with its traceback
    assert "error: rank 0 stopped: another rank failed or stopped answering" in proc.stderr
    assert not (tmp_path / "two" / "final").exists()


def test_a_user_error_is_one_line_from_rank_0(tiny_model_dir, tmp_path):
    config = config_file(tmp_path, tiny_model_dir, max_length=4)  # every pair dropped by truncation
    proc = run_two(config, tmp_path / "two")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "no usable" in lines[0] and "dropped by truncation" in lines[0]
    assert "]: Traceback" not in proc.stderr  # no rank's traceback (torchrun adds its own summary below)


def test_sigterm_under_torchrun_checkpoints_and_resumes_at_one_rank(tiny_model_dir, tmp_path):
    """torchrun passes SIGTERM to every rank; they stop after the same step, rank 0 writes the
    checkpoint; the run resumed in one process (batch 2·b) ends with every logged row equal."""
    config = config_file(tmp_path, tiny_model_dir, finetuning_type="lora", num_train_epochs=4, logging_steps=4)
    run_one(config, tmp_path / "one", "per_device_train_batch_size=4")
    proc = run_two(config, tmp_path / "two", "per_device_train_batch_size=2", extra_env={"SIGTERM_AFTER_STEP": "5"})
    assert proc.returncode != 0
    assert proc.stderr.count("stopped by SIGTERM at step") == 1, proc.stderr[-3000:]
    step = int(proc.stderr.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert step >= 5 and (tmp_path / "two" / "checkpoints" / f"step-{step}" / "trainer_state.json").is_file()
    # a partly filled logging window (logging_steps 4, the stop at step 5-7) and the guard's window are in it
    run_one(config, tmp_path / "two", "per_device_train_batch_size=4", "resume_from_checkpoint=true")
    assert_same_run(tmp_path / "one", tmp_path / "two")


def test_shares_are_balanced_by_tokens_and_cover_the_batch():
    """8 pairs (batch positions 0-7) of sizes [100, 90, 10, 10, 10, 10, 50, 40] over 2 ranks, at most 4
    each; longest first to the rank with fewer tokens (ties: the lower rank):
    pos0 100→r0 [100, 0], pos1 90→r1 [100, 90], pos6 50→r1 [100, 140], pos7 40→r0 [140, 140],
    then the 10s at pos 2, 3, 4, 5 alternate r0, r1, r0, r1 → [160, 160].
    r0 holds positions 0, 2, 4, 7 = indices [7, 5, 0, 4]; r1 positions 1, 3, 5, 6 = [3, 1, 2, 6]."""
    from preftune.distributed import Ranks

    indices = [7, 3, 5, 1, 0, 2, 6, 4]
    sizes = [100, 90, 10, 10, 10, 10, 50, 40]
    shares = [Ranks(rank=r, world_size=2).shard(indices, sizes) for r in (0, 1)]
    assert shares == [[7, 5, 0, 4], [3, 1, 2, 6]]
    assert sorted(shares[0] + shares[1]) == sorted(indices)
    token = dict(zip(indices, sizes))
    assert [sum(token[i] for i in s) for s in shares] == [160, 160]
    # an odd batch of 1: rank 1's share is empty (the loop gives it a zero-weighted pair)
    assert [Ranks(rank=r, world_size=2).shard([9], [5]) for r in (0, 1)] == [[9], []]
    assert Ranks(rank=1, world_size=2).share([9], [5]) == ([], 1.0)  # ddp: rank 1 skips the micro-batch
    assert Ranks(rank=1, world_size=2, lockstep=True).share([9], [5]) == ([9], 0.0)  # fsdp: a placeholder
    assert Ranks().shard(indices, sizes) == indices


def test_llamafactory_distributed_keys():
    from preftune.config import from_dict
    from preftune.errors import PreftuneError

    base = {"model_name_or_path": "m", "train_file": "t.jsonl"}
    assert from_dict({**base, "ddp_timeout": 180000}).training.ddp_timeout == 180000
    with pytest.raises(PreftuneError, match="'deepspeed' is not supported.*distributed: fsdp"):
        from_dict({**base, "deepspeed": "ds_z3_config.json"})
    with pytest.raises(PreftuneError, match="'distributed' is 'fdsp'.*did you mean 'fsdp'"):
        from_dict({**base, "distributed": "fdsp"})


def test_bf16_weight_grads_turn_off_under_torchrun_with_a_reason(tiny_model_dir):
    """They keep gradients outside .grad, where the sum over the ranks would miss them."""
    import torch

    from preftune.config import from_dict
    from preftune.memory import MemoryPlan
    from preftune.modeling import build_policy_and_reference

    cfg = from_dict({"model_name_or_path": tiny_model_dir, "train_file": "t.jsonl", "finetuning_type": "full",
                     "bf16": True})  # fmt: skip
    cpu = torch.device("cpu")
    for distributed in (False, True):
        model, reference = build_policy_and_reference(cfg.model, tiny_model_dir, cpu, True)
        with MemoryPlan.apply(cfg, model, reference, cpu, precompute_reference=True, distributed=distributed) as plan:
            assert (plan.bf16_grads is None) == distributed
            assert bool(plan.notes) == distributed
            if distributed:
                assert "bf16_weight_grads off under torchrun" in plan.summary()["memory_plan_notes"][0]
