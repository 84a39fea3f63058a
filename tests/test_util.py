"""The shared helpers: atomic file and directory writes, "did you mean", type names, the oneDNN cap."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from preftune import util


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    util.atomic_write_text(path, "old")
    with pytest.raises(RuntimeError):
        util.atomic_write(path, lambda tmp: (tmp.write_text("half"), (_ for _ in ()).throw(RuntimeError("disk"))))
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    util.atomic_write_text(path, "new")
    assert path.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def fill(text):
    return lambda tmp: (tmp / "model.safetensors").write_text(text)


def test_atomic_dir_swaps_and_a_failed_write_keeps_the_old(tmp_path):
    target = tmp_path / "final"
    util.atomic_dir(target, fill("one"))
    util.atomic_dir(target, fill("two"))
    assert (target / "model.safetensors").read_text() == "two"

    def broken(tmp):
        (tmp / "model.safetensors").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        util.atomic_dir(target, broken)
    assert (target / "model.safetensors").read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_atomic_dir_puts_the_old_back_when_the_swap_fails(tmp_path, monkeypatch):
    """The old directory is moved aside before the new one is renamed in: if that rename fails,
    the old one must come back, not be deleted with the leftovers."""
    target = tmp_path / "final"
    util.atomic_dir(target, fill("old"))
    real_rename = Path.rename

    def failing_rename(self, dest):
        if Path(dest) == target and self.name.endswith(".tmp"):
            raise OSError("rename failed")
        return real_rename(self, dest)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(OSError, match="rename failed"):
        util.atomic_dir(target, fill("new"))
    assert (target / "model.safetensors").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_a_killed_writers_leftovers_are_removed_by_the_next_write(tmp_path):
    """A run killed mid-save leaves a hidden copy named after its host and pid; the next save of
    the same target removes it, and leaves a live writer's copy alone."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    host = util._host()
    stale = tmp_path / f".final.{host}-{dead_pid}.abcd1234.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_text("weights")
    live = tmp_path / f".final.{host}-{os.getppid()}.abcd1234.tmp"  # our parent is alive
    live.mkdir()
    util.atomic_dir(tmp_path / "final", fill("new"))
    assert not stale.exists() and live.exists()


def test_did_you_mean_and_type_names():
    assert util.did_you_mean("betta", ["beta", "loss_type"]) == "; did you mean 'beta'?"
    assert util.did_you_mean("zzz", ["beta"]) == ""
    assert [util.type_name(v) for v in (None, True, "x", {}, [], 1.5)] == ["null", "bool", "string", "object",
                                                                          "list", "float"]  # fmt: skip
    assert util.type_name({}, mapping="mapping") == "mapping"


def test_onednn_cap_is_set_for_the_run_and_the_callers_environment_restored(monkeypatch):
    monkeypatch.delenv(util.ONEDNN_CACHE, raising=False)
    with util.onednn_cache_capacity():
        assert os.environ[util.ONEDNN_CACHE] == "128"
    assert util.ONEDNN_CACHE not in os.environ
    monkeypatch.setenv(util.ONEDNN_CACHE, "512")
    with util.onednn_cache_capacity():
        assert os.environ[util.ONEDNN_CACHE] == "512"  # the user's own setting wins
    assert os.environ[util.ONEDNN_CACHE] == "512"


def test_importing_preftune_sets_no_environment_variable():
    code = "import os; before = dict(os.environ); import preftune, preftune.cli; print(dict(os.environ) == before)"
    env = {k: v for k, v in os.environ.items() if k != util.ONEDNN_CACHE}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.stdout.strip() == "True", result.stderr
