"""Read the records of one data file as ``(where, record)`` pairs.

JSON (an array, or JSON Lines saved as .json), JSON Lines, CSV, Parquet and datasets'
``save_to_disk`` directories.  ``where`` is the ``source`` of the pair built from the record
(``data.jsonl:7``, ``prefs.json:14 (record 3)``, ``data.csv:4``, ``data.parquet row 3``,
``ds/train row 3``); malformed files raise a one-line :class:`PreftuneError` naming it.
Text files are decoded as UTF-8 (BOM allowed) or UTF-16 with a BOM.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

from preftune.data.common import STRICT_JSON, data_error, first_line, keys_list, strict_json_problem, type_name
from preftune.errors import PreftuneError
from preftune.util import did_you_mean

FILE_TYPES = (".json", ".jsonl", ".csv", ".parquet")
_FILE_TYPES_HINT = "use .json, .jsonl, .csv, .parquet or a save_to_disk directory"

_WS = re.compile(r"[ \t\n\r]*")


def decode_text(data: bytes, label: str) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 with BOM (e.g. Windows PowerShell output)
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as e:
            raise data_error(f"not valid UTF-16 (at offset {e.start})", label) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        bad = data[e.start : e.start + 1].hex()
        raise data_error(
            f"not valid UTF-8 (byte 0x{bad} at offset {e.start}) on line {line}; re-save the file as UTF-8", label
        ) from None


def read_bytes(path: Path, label: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise data_error(f"cannot read the file ({e.strerror or first_line(e)})", label) from None


def json_error(e: json.JSONDecodeError, label: str) -> PreftuneError:
    return data_error(f"invalid JSON ({e.msg}: column {e.colno})", f"{label}:{e.lineno}")


def _read_jsonl_text(text: str, label: str) -> list[tuple[str, Any]]:
    records = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        where = f"{label}:{lineno}"
        try:
            record = STRICT_JSON.decode(stripped)
        except json.JSONDecodeError as e:
            hint = ""
            if stripped in ("[", "{", "[{") or e.pos >= len(stripped):
                hint = "; JSON Lines needs one complete object per line"
            raise data_error(f"invalid JSON ({e.msg}: column {e.colno}){hint}", where) from None
        except (ValueError, RecursionError) as e:
            raise data_error(strict_json_problem(e) or first_line(e), where) from None
        if not isinstance(record, dict):
            hint = " (a JSON array belongs in a .json file)" if isinstance(record, list) else ""
            raise data_error(f"expected a JSON object, got {type_name(record)}{hint}", where)
        records.append((where, record))
    return records


def _json_array_with_lines(text: str, label: str) -> list[tuple[int, Any]]:
    """Parse a JSON array, returning (line of the element's start, element) pairs.

    Raises ValueError (or JSONDecodeError) when ``text`` is not a JSON array, and a one-line
    :class:`PreftuneError` naming the element's line for a value :data:`STRICT_JSON` refuses.
    """
    decoder = STRICT_JSON
    i = _WS.match(text, 0).end()
    if text[i : i + 1] != "[":
        raise ValueError("not an array")
    i = _WS.match(text, i + 1).end()
    items: list[tuple[int, Any]] = []
    line, pos = 1, 0
    if text[i : i + 1] == "]":
        end = i + 1
    else:
        while True:
            line += text.count("\n", pos, i)
            pos = i
            try:
                value, end = decoder.raw_decode(text, i)
            except (ValueError, RecursionError) as e:
                problem = strict_json_problem(e)
                if problem is None:
                    raise
                raise data_error(problem, f"{label}:{line} (record {len(items) + 1})") from None
            items.append((line, value))
            i = _WS.match(text, end).end()
            if text[i : i + 1] == ",":
                i = _WS.match(text, i + 1).end()
                continue
            if text[i : i + 1] != "]":
                raise ValueError("expected , or ]")
            end = i + 1
            break
    if _WS.match(text, end).end() != len(text):
        raise ValueError("extra data")
    return items


def _read_json_text(text: str, label: str) -> list[tuple[str, Any]]:
    try:
        items = _json_array_with_lines(text, label)
    except (ValueError, IndexError):
        items = None
    if items is not None:
        out = []
        for index, (line, record) in enumerate(items, start=1):
            where = f"{label}:{line} (record {index})"
            if not isinstance(record, dict):
                raise data_error(f"expected a JSON object, got {type_name(record)}", where)
            out.append((where, record))
        return out
    try:
        data = STRICT_JSON.decode(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return _read_jsonl_text(text, label)  # JSON Lines saved as .json (e.g. Dataset.to_json)
        raise json_error(e, label) from None
    except (ValueError, RecursionError) as e:
        raise data_error(strict_json_problem(e) or first_line(e), label) from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        hint = f"; the records seem to be under '{lists[0]}': make that list the whole file" if len(lists) == 1 else ""
        raise data_error(f"expected a JSON array of records, got an object (keys: {keys_list(data)}){hint}", label)
    raise data_error(f"expected a JSON array of records, got {type_name(data)}", label)


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _check_csv_text(text: str, label: str) -> None:
    """NUL bytes and a header that is not comma-separated, named before the rows are read."""
    nul = text.find("\x00")
    if nul != -1:
        hint = " (a UTF-16 file without a byte-order mark? re-save it as UTF-8)" if text.count("\x00") > 8 else ""
        raise data_error(f"a NUL byte in a cell; CSV cells must be text{hint}", f"{label}:{_line_of(text, nul)}")
    header_line = text.split("\n", 1)[0]
    if "," not in header_line:
        for sep, name in ((";", "semicolons"), ("\t", "tabs")):
            if sep in header_line:
                raise data_error(
                    f"the header is separated by {name}, not commas; preftune reads comma-separated CSV "
                    "(save it with ',' between cells, or as .jsonl)",
                    f"{label}:1",
                )


def _unclosed_quote_line(text: str) -> int | None:
    """The line of the row whose quoted cell is never closed (it runs to the end of the file), or None.
    An odd number of quote characters is the sign (a stray quote inside an unquoted cell, as in
    ``12" pizza``, is one too); a strict re-read tells which."""
    if text.count('"') % 2 == 0:
        return None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 1
    while True:
        try:
            next(reader)
        except StopIteration:
            return None
        except csv.Error as e:
            return start if "unexpected end of data" in str(e) else None
        start = reader.line_num + 1


def _unclosed_quote_error(line: int, label: str, detail: str = "") -> PreftuneError:
    where = f"{label}:{line}"
    return data_error(f"unclosed quote: a quoted cell in this row runs to the end of the file{detail}", where)


def _cell_count_error(text: str, row: list[str], header: list[str], start: int, label: str) -> PreftuneError:
    """Why a row has the wrong number of cells: an unclosed quote swallows the rest of the file (or
    the rows up to the next quote) into one cell, which "row has 1 cells" does not say."""
    where = f"{label}:{start}"
    unclosed = _unclosed_quote_line(text)
    if unclosed is not None:
        return _unclosed_quote_error(unclosed, label, f" ({len(row)} cells read, the header has {len(header)} columns)")
    spans = max((c.count("\n") for c in row), default=0)
    if spans:
        return data_error(
            f"row has {len(row)} cells but the header has {len(header)} columns; a quoted cell spans "
            f"{spans + 1} lines (lines {start}-{start + spans}): is a quote unclosed?",
            where,
        )
    return data_error(f"row has {len(row)} cells but the header has {len(header)} columns", where)


def _read_csv_text(text: str, label: str) -> list[tuple[str, Any]]:
    _check_csv_text(text, label)
    old_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # long completions exceed the 128 KiB default
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        try:
            header = next(reader)
        except StopIteration:
            return []
        except csv.Error as e:
            raise data_error(f"invalid CSV ({e})", f"{label}:1") from None
        header = [h.strip() for h in header]
        seen = set()
        for name in header:
            if name and name in seen:
                raise data_error(f"column '{name}' appears twice in the header", f"{label}:1")
            seen.add(name)
        records = []
        start = reader.line_num + 1
        while True:
            row_start, where = start, f"{label}:{start}"
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise data_error(f"invalid CSV ({e})", where) from None
            start = reader.line_num + 1
            if not row or (len(row) == 1 and not row[0].strip() and len(header) > 1):
                continue  # blank line
            if len(row) > len(header) and not any(c.strip() for c in row[len(header) :]):
                row = row[: len(header)]  # trailing empty cells, as spreadsheets export them
            if len(row) != len(header):
                raise _cell_count_error(text, row, header, row_start, label)
            records.append((where, dict(zip(header, row))))
        unclosed = _unclosed_quote_line(text)  # the last cell of the last row swallowed the rest of the file
        if unclosed is not None:
            raise _unclosed_quote_error(unclosed, label)
        return records
    finally:
        csv.field_size_limit(old_limit)


def _read_parquet(path: Path, label: str) -> list[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise data_error(f"not a readable Parquet file ({first_line(e)})", label) from None
    return [(f"{label} row {i}", row) for i, row in enumerate(rows, start=1)]


def is_save_to_disk_dir(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _read_save_to_disk(path: Path, label: str) -> list[tuple[str, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - any failure to load user data is a user-facing error
        raise data_error(f"cannot load the save_to_disk directory ({first_line(e)})", label) from None
    prefix = label
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded.keys())
        if "train" in loaded:
            split = "train"
        elif len(splits) == 1:
            split = splits[0]
        else:
            raise data_error(
                f"the DatasetDict has splits {', '.join(splits) or 'none'} and none is named 'train'", label
            )
        loaded = loaded[split]
        prefix = f"{label.rstrip('/')}/{split}"
    rows = loaded.to_list()
    return [(f"{prefix} row {i}", row) for i, row in enumerate(rows, start=1)]


def read_file(path: Path, label: str) -> list[tuple[str, Any]]:
    """Records of one file or save_to_disk directory as (where, record) pairs."""
    try:
        path.stat()
    except FileNotFoundError:
        pass  # named below, with the closest file name
    except (OSError, ValueError) as e:  # a name too long, a NUL in the path, no permission, ...
        raise data_error(f"cannot read the file ({getattr(e, 'strerror', None) or first_line(e)})", label) from None
    if path.is_dir():
        if is_save_to_disk_dir(path):
            return _read_save_to_disk(path, label)
        raise data_error(
            "is a directory but not one written by datasets' save_to_disk "
            f"(no state.json or dataset_dict.json); {_FILE_TYPES_HINT}",
            label,
        )
    if not path.exists():
        hint = ""
        parent = path.parent
        if parent.is_dir():
            try:
                names = [p.name for p in parent.iterdir()]
            except OSError:
                names = []
            hint = did_you_mean(path.name, names)
        raise data_error(f"file not found{hint}", label)
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        shown = suffix or "(no extension)"
        raise data_error(f"unsupported file type '{shown}'; {_FILE_TYPES_HINT}", label)
    if suffix == ".parquet":
        return _read_parquet(path, label)
    text = decode_text(read_bytes(path, label), label)
    if not text.strip():
        raise data_error("no preference pairs found (the file is empty)", label)
    if suffix == ".jsonl":
        return _read_jsonl_text(text, label)
    if suffix == ".json":
        return _read_json_text(text, label)
    return _read_csv_text(text, label)


def check_not_csv(path: Path, fmt: str, label: str) -> None:
    if fmt in ("conversational", "sharegpt") and path.suffix.lower() == ".csv" and not path.is_dir():
        raise data_error(
            f"the {fmt} format needs lists of messages, which CSV cells cannot hold; use .jsonl, .json or .parquet",
            label,
        )


def read_nonempty(path: Path, label: str) -> list[tuple[str, Any]]:
    records = read_file(path, label)
    if not records:
        raise data_error("no preference pairs found (the file has no records)", label)
    return records

