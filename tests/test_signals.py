"""SIGTERM / SIGINT during training: the step finishes, a checkpoint is written, one line, exit
128 + signal; resuming from it gives the uninterrupted run's rows exactly."""

import os
import signal
import subprocess
import sys
import time

import pytest

from preftune import train
from preftune.errors import RunStopped
from test_train import TRAIN_KEYS, base_config, rows


def signal_after_step(monkeypatch, at_step: int, *signals):
    """Send ``signals`` to this process right after optimizer step ``at_step``."""
    from preftune.memory.plan import MemoryPlan

    original, calls = MemoryPlan.after_step, []

    def after_step(self):
        original(self)
        calls.append(1)
        if len(calls) == at_step:
            for sig in signals:
                os.kill(os.getpid(), sig)

    monkeypatch.setattr(MemoryPlan, "after_step", after_step)


@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_sigterm_checkpoints_the_step_and_resume_is_exact(tiny_model_dir, tmp_path, monkeypatch, finetuning_type):
    common = dict(max_steps=6, per_device_train_batch_size=2, finetuning_type=finetuning_type, warmup_steps=2,
                  lr_scheduler_type="cosine")  # fmt: skip
    straight = tmp_path / "straight"
    train(base_config(tiny_model_dir, tmp_path, output_dir=str(straight), **common))
    out = tmp_path / "stopped"
    before = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as m:
        signal_after_step(m, 3, signal.SIGTERM)
        with pytest.raises(RunStopped) as stop:
            train(base_config(tiny_model_dir, tmp_path, output_dir=str(out), **common))
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler is back
    assert stop.value.exit_code == 143 and stop.value.step == 3
    assert str(stop.value) == "stopped by SIGTERM at step 3; resume with resume_from_checkpoint=true"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-3"]
    assert not (out / "final").exists()
    train(base_config(tiny_model_dir, tmp_path, output_dir=str(out), resume_from_checkpoint=True, **common))
    ours, theirs = rows(out), rows(straight)
    assert [r["step"] for r in ours] == [1, 2, 3, 4, 5, 6]
    assert [{k: r[k] for k in TRAIN_KEYS} for r in ours] == [{k: r[k] for k in TRAIN_KEYS} for r in theirs]


def test_resume_mid_window_gives_every_logged_row(tiny_model_dir, tmp_path, monkeypatch):
    """Stopped at step 3 with a logging window of 2 steps and a guard window of 4 half filled: the
    checkpoint keeps both, so the resumed run logs exactly the uninterrupted run's rows, guard rows
    included (before, both windows restarted at the resumed step)."""
    import json

    common = dict(max_steps=8, per_device_train_batch_size=2, logging_steps=2, eval_steps=4, eval_split=0.25)
    straight = tmp_path / "straight"
    train(base_config(tiny_model_dir, tmp_path, output_dir=str(straight), **common))
    out = tmp_path / "stopped"
    with monkeypatch.context() as m:
        signal_after_step(m, 3, signal.SIGTERM)
        with pytest.raises(RunStopped):
            train(base_config(tiny_model_dir, tmp_path, output_dir=str(out), **common))
    train(base_config(tiny_model_dir, tmp_path, output_dir=str(out), resume_from_checkpoint=True, **common))
    drop = {"tokens_per_second"}
    ours, theirs = (json.loads((d / "log_history.json").read_text()) for d in (out, straight))
    assert any("guard/chosen_logp_drop" in r for r in theirs)
    assert [{k: v for k, v in r.items() if k not in drop} for r in ours] == [
        {k: v for k, v in r.items() if k not in drop} for r in theirs]


def test_a_second_ctrl_c_stops_at_once(tiny_model_dir, tmp_path, monkeypatch):
    signal_after_step(monkeypatch, 2, signal.SIGINT, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(base_config(tiny_model_dir, tmp_path, output_dir=str(tmp_path / "run"), max_steps=6))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_cli_sigterm_exits_143_with_one_line(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(f"model_name_or_path: {tiny_model_dir}\ntrain_file: {tmp_path / 'pairs.jsonl'}\n"
                      f"output_dir: {out}\nmax_steps: 100000\nprogress: false\nbf16: false\n")  # fmt: skip
    from test_train import write_pairs

    write_pairs(tmp_path / "pairs.jsonl")
    proc = subprocess.Popen([sys.executable, "-m", "preftune.cli", "train", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 120
    while not (out / "config.yaml").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(0.5)  # a few steps in
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM at step ") and last.endswith("resume with resume_from_checkpoint=true")
    step = int(last.split("at step ")[1].split(";")[0])
    assert (out / "checkpoints" / f"step-{step}" / "trainer_state.json").is_file() and "Traceback" not in err
