"""``report_to: tensorboard``: every logged scalar as a TensorBoard event file, without TensorBoard.

The file format is small and stable, so it is written here instead of pulling in tensorboard (and
protobuf, grpcio, ...) as a dependency:

* a file ``output_dir/runs/events.out.tfevents.<seconds>.<host>.<pid>.<n>`` (``tensorboard --logdir
  output_dir`` finds it; a resumed run adds a file of its own next to the first one's);
* a sequence of TFRecords: ``uint64 length``, ``uint32 masked_crc32c(length bytes)``, ``data``,
  ``uint32 masked_crc32c(data)``, little-endian; CRC-32C (Castagnoli), masked as
  ``((crc >> 15 | crc << 17) + 0xa282ead8) mod 2**32``;
* each record an ``Event`` protocol buffer: ``wall_time`` (field 1, double), ``step`` (2, int64) and
  either ``file_version`` (3, string; "brain.Event:2" in the first record) or ``summary`` (5): a
  ``Summary`` of ``Value``s, each a ``tag`` (1, string) and a ``simple_value`` (2, float).

Use::

    writer = tensorboard_log.open(output_dir)   # or open_for(cfg, output_dir): a no-op writer without report_to
    writer.add_row(row, step)                   # every logged row: train rows and eval_ rows
    writer.close()

Tags: ``loss`` -> ``train/loss``, ``rewards/margins`` -> ``train/rewards/margins``, ``eval_loss`` ->
``eval/loss``; ``step`` is the event's step, not a scalar; values that are not numbers are left out.
Each row is flushed to disk when written, so a killed run leaves every row it logged.
"""

from __future__ import annotations

import builtins
import math
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["TensorBoardWriter", "NullWriter", "open", "open_for", "read_events", "scalar_tag"]

FILE_VERSION = "brain.Event:2"


# ---------------------------------------------------------------- CRC-32C and TFRecord framing


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
    """One TFRecord holding ``data``."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


# ---------------------------------------------------------------- the Event protocol buffer


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 two's complement, as protobuf writes negative numbers
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _summary_value(tag: str, value: float) -> bytes:
    return _length_delimited(1, tag.encode("utf-8")) + _varint(2 << 3 | 5) + struct.pack("<f", value)


def event(wall_time: float, step: int, *, file_version: str | None = None,
          scalars: list[tuple[str, float]] | None = None) -> bytes:  # fmt: skip
    """An ``Event`` message: the file version, or a summary of scalars."""
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time)
    if step:  # proto3 leaves a field at its default (0) out
        out += _varint(2 << 3 | 0) + _varint(step)
    if file_version is not None:
        out += _length_delimited(3, file_version.encode("utf-8"))
    if scalars:
        summary = b"".join(_length_delimited(1, _summary_value(tag, value)) for tag, value in scalars)
        out += _length_delimited(5, summary)
    return out


# ---------------------------------------------------------------- writers


def scalar_tag(key: str) -> str:
    """The TensorBoard tag of a log-row key: ``eval_loss`` -> ``eval/loss``, ``loss`` -> ``train/loss``."""
    return "eval/" + key[len("eval_") :] if key.startswith("eval_") else "train/" + key


def _scalars(row: dict[str, Any]) -> list[tuple[str, float]]:
    out = []
    for key, value in row.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        try:
            number = float(value)
        except OverflowError:
            number = math.inf if value > 0 else -math.inf
        out.append((scalar_tag(str(key)), number))
    return out


class TensorBoardWriter:
    """Appends events to one event file; every ``add_row`` is on disk when it returns."""

    _opened = 0

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        TensorBoardWriter._opened += 1
        host = socket.gethostname().replace(".", "_") or "host"
        name = f"events.out.tfevents.{int(time.time())}.{host}.{os.getpid()}.{TensorBoardWriter._opened}"
        self.path = directory / name
        self._file: BinaryIO | None = builtins.open(self.path, "xb")
        self._write(event(time.time(), 0, file_version=FILE_VERSION))

    def _write(self, data: bytes) -> None:
        if self._file is None:
            raise ValueError(f"{self.path} is closed")
        self._file.write(record(data))
        self._file.flush()

    def add_scalar(self, tag: str, value: float, step: int, wall_time: float | None = None) -> None:
        self._write(event(time.time() if wall_time is None else wall_time, int(step), scalars=[(tag, float(value))]))

    def add_row(self, row: dict[str, Any], step: int | None = None, wall_time: float | None = None) -> None:
        """Every number of a log row as a scalar at ``step`` (default: the row's own ``step``)."""
        scalars = _scalars(row)
        if not scalars:
            return
        step = row.get("step", 0) if step is None else step
        self._write(event(time.time() if wall_time is None else wall_time, int(step), scalars=scalars))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NullWriter:
    """The writer when ``report_to`` names no logger: every call does nothing."""

    path = None

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def add_row(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> NullWriter:
        return self

    def __exit__(self, *exc) -> None:
        pass


def open(out_dir: str | Path) -> TensorBoardWriter:  # noqa: A001 - read as tensorboard_log.open
    """A new event file under ``out_dir/runs``."""
    return TensorBoardWriter(Path(out_dir) / "runs")


def open_for(cfg: Any, out_dir: str | Path) -> TensorBoardWriter | NullWriter:
    """``open(out_dir)`` when the config's ``report_to`` names tensorboard, else a :class:`NullWriter`."""
    return open(out_dir) if cfg.training.uses_tensorboard else NullWriter()


# ---------------------------------------------------------------- reading back (tests, tools)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes) -> list[tuple[int, int, Any]]:
    """(field number, wire type, value) of a protobuf message: the subset the Event uses."""
    out, pos = [], 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
            if value >= 1 << 63:
                value -= 1 << 64
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            size, pos = _read_varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.append((number, wire, value))
    return out


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """The events of an event file, each ``{"wall_time", "step", "file_version"?, "scalars"?}``;
    checks every record's framing and both checksums (ValueError on a corrupt file)."""
    data = Path(path).read_bytes()
    events, pos = [], 0
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError(f"truncated record header at byte {pos}")
        length_bytes = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", length_bytes)
        (length_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        if masked_crc32c(length_bytes) != length_crc:
            raise ValueError(f"bad length checksum at byte {pos}")
        if pos + 16 + length > len(data):
            raise ValueError(f"truncated record at byte {pos}")
        body = data[pos + 12 : pos + 12 + length]
        (body_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
        if masked_crc32c(body) != body_crc:
            raise ValueError(f"bad data checksum at byte {pos}")
        pos += 16 + length
        ev: dict[str, Any] = {"step": 0}
        for number, _, value in _fields(body):
            if number == 1:
                ev["wall_time"] = struct.unpack("<d", value)[0]
            elif number == 2:
                ev["step"] = value
            elif number == 3:
                ev["file_version"] = value.decode("utf-8")
            elif number == 5:
                scalars = ev.setdefault("scalars", {})
                for _, _, item in _fields(value):
                    tag, simple = None, None
                    for n, _, v in _fields(item):
                        if n == 1:
                            tag = v.decode("utf-8")
                        elif n == 2:
                            simple = struct.unpack("<f", v)[0]
                    scalars[tag] = simple
        events.append(ev)
    return events
