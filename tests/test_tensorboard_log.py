"""report_to: tensorboard — event files written by hand, checked against TensorBoard's own bytes."""

from __future__ import annotations

import math
import struct

import pytest

from preftune import tensorboard_log as tb
from preftune.config import load_config

# Written by TensorBoard 2.21's own RecordWriter (tensorboard.summary.writer.record_writer) from
# event_pb2.Event(wall_time=1700000000.25, step=7, summary=Summary(value=[Value(tag="train/loss",
# simple_value=0.5), Value(tag="eval/x", simple_value=-1.25)])) and from
# Event(wall_time=1700000000.25, file_version="brain.Event:2").
TENSORBOARD_SCALARS = bytes.fromhex(
    "2f000000000000006d5d1d500900001040fc54d94110072a220a110a0a747261696e2f6c6f7373150000003f0a0d0a066576616c2f78"
    "150000a0bf2c5cc2b9"
)
TENSORBOARD_VERSION = bytes.fromhex(
    "1800000000000000a37f4b220900001040fc54d9411a0d627261696e2e4576656e743a32338d2fe9"
)


def test_crc32c_known_values():
    assert tb.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert tb.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720, B.4
    assert tb.crc32c(bytes([0xFF] * 32)) == 0x62A8AB43


def test_records_equal_tensorboards_own_bytes():
    scalars = tb.event(1700000000.25, 7, scalars=[("train/loss", 0.5), ("eval/x", -1.25)])
    assert tb.record(scalars) == TENSORBOARD_SCALARS
    assert tb.record(tb.event(1700000000.25, 0, file_version="brain.Event:2")) == TENSORBOARD_VERSION


def test_reading_back_tensorboards_bytes(tmp_path):
    path = tmp_path / "events.out.tfevents.1.host"
    path.write_bytes(TENSORBOARD_VERSION + TENSORBOARD_SCALARS)
    assert tb.read_events(path) == [
        {"step": 0, "wall_time": 1700000000.25, "file_version": "brain.Event:2"},
        {"step": 7, "wall_time": 1700000000.25, "scalars": {"train/loss": 0.5, "eval/x": -1.25}},
    ]


def test_writer_round_trip(tmp_path):
    writer = tb.open(tmp_path / "out")
    assert writer.path.parent == tmp_path / "out" / "runs" and writer.path.name.startswith("events.out.tfevents.")
    writer.add_row({"loss": 0.6931, "rewards/margins": -0.25, "epoch": 0.5, "step": 1, "grad_norm": 3,
                    "note": "text", "flag": True, "missing": None})  # fmt: skip
    first = tb.read_events(writer.path)  # on disk as soon as add_row returns
    assert len(first) == 2
    writer.add_row({"eval_loss": 0.5, "eval_rewards/accuracies": 1.0, "epoch": 1.0, "step": 2})
    writer.add_row({"loss": float("nan"), "step": 3}, step=30)
    writer.add_row({"step": 4})  # no scalars: nothing written
    writer.close()
    writer.close()  # twice is fine
    events = tb.read_events(writer.path)
    assert events[0]["file_version"] == "brain.Event:2" and events[0]["step"] == 0
    assert [e["step"] for e in events[1:]] == [1, 2, 30]
    row1 = events[1]["scalars"]
    assert set(row1) == {"train/loss", "train/rewards/margins", "train/epoch", "train/grad_norm"}
    assert row1["train/loss"] == struct.unpack("<f", struct.pack("<f", 0.6931))[0]
    assert row1["train/rewards/margins"] == -0.25 and row1["train/grad_norm"] == 3.0
    assert events[2]["scalars"] == {"eval/loss": 0.5, "eval/rewards/accuracies": 1.0, "train/epoch": 1.0}
    assert math.isnan(events[3]["scalars"]["train/loss"])
    assert all(e["wall_time"] > 1.6e9 for e in events)
    with pytest.raises(ValueError, match="closed"):
        writer.add_row({"loss": 1.0, "step": 5})


def test_each_writer_has_its_own_file(tmp_path):
    with tb.open(tmp_path) as a, tb.open(tmp_path) as b:
        a.add_scalar("train/loss", 1.0, 1)
        b.add_scalar("train/loss", 2.0, 1)
    assert a.path != b.path
    assert tb.read_events(a.path)[1]["scalars"] == {"train/loss": 1.0}
    assert tb.read_events(b.path)[1]["scalars"] == {"train/loss": 2.0}


def test_a_corrupt_file_is_found(tmp_path):
    with tb.open(tmp_path) as writer:
        writer.add_scalar("train/loss", 1.0, 1, wall_time=1.0)
    data = bytearray(writer.path.read_bytes())
    data[-6] ^= 0x01  # a bit of the last record's data
    writer.path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="bad data checksum"):
        tb.read_events(writer.path)
    writer.path.write_bytes(bytes(data[:-3]))
    with pytest.raises(ValueError, match="truncated record"):
        tb.read_events(writer.path)


def test_tags():
    assert tb.scalar_tag("loss") == "train/loss"
    assert tb.scalar_tag("eval_rewards/margins") == "eval/rewards/margins"
    assert tb.scalar_tag("logps/chosen") == "train/logps/chosen"


@pytest.mark.parametrize("value, tensorboard", [("tensorboard", True), (["tensorboard"], True), ("none", False),
                                                ([], False), (None, False), (["none"], False)])  # fmt: skip
def test_report_to_values(value, tensorboard, tmp_path):
    cfg = load_config({"train_file": "x.jsonl", "report_to": value})
    assert cfg.training.uses_tensorboard is tensorboard
    writer = tb.open_for(cfg, tmp_path)
    writer.add_row({"loss": 1.0, "step": 1})
    writer.close()
    assert (tmp_path / "runs").exists() is tensorboard
    assert load_config(cfg.to_flat()).training.report_to == cfg.training.report_to  # the saved config loads
