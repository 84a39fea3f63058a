"""Reading config values: strict, bounded YAML and the check of each value against its field's type.

``load_yaml_value`` refuses a key given twice, integers longer than Python reads and alias bombs
(more than ``MAX_CONFIG_VALUES`` values once expanded); ``coerce`` checks a value against a field's
annotation (ints for floats, LLaMA-Factory's comma-separated lists, finite numbers, 64-bit integers,
text without NUL or lone surrogates)."""

from __future__ import annotations

import math
import re
import sys
import types
import typing
from typing import Any

import yaml

from preftune.errors import PreftuneError, shown

INT_RANGE = (-(2**63), 2**63 - 1)
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed takes



def _check_text(key: str, value: str, where: str | None) -> str:
    if "\x00" in value:
        raise PreftuneError(f"'{key}' holds a NUL character", where)
    if re.search("[\ud800-\udfff]", value):
        raise PreftuneError(f"'{key}' holds a lone surrogate ({shown(value)}), which is not text", where)
    return value


def _check_int(key: str, value: int, where: str | None) -> int:
    low, high = SEED_RANGE if key == "seed" else INT_RANGE
    if not low <= value <= high:
        kind = "an unsigned 64-bit" if key == "seed" else "a 64-bit"
        raise PreftuneError(f"'{key}' must fit in {kind} integer, got {shown(value)}", where)
    return value


def _check_float(key: str, value: Any, where: str | None) -> float:
    try:
        number = float(value)
    except OverflowError:
        raise PreftuneError(f"'{key}' is too large: {shown(value)}", where) from None
    if not math.isfinite(number):
        raise PreftuneError(f"'{key}' must be a finite number, got {shown(value)}", where)
    return number


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


class _Mismatch(PreftuneError):
    """A value of the wrong type (a union tries its next type); any other error is the value's own."""


def coerce(key: str, value: Any, tp, where: str | None) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(key, value, arg, where)
            except _Mismatch as e:
                errors.append(e)
        expected = " or ".join(_type_name(a) for a in args if a is not type(None))
        raise _Mismatch(f"'{key}' must be {expected}, got {shown(value)}", where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str) and item_tp is str:
            # LLaMA-Factory writes lists as comma-separated strings
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (int, float)) and item_tp is float and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise _Mismatch(f"'{key}' must be a list, got {shown(value)}", where)
        return [coerce(key, v, item_tp, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch(f"'{key}' must be true or false, got {shown(value)}", where)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return _check_int(key, value, where)
        if isinstance(value, float) and value.is_integer():
            return _check_int(key, int(value), where)
        raise _Mismatch(f"'{key}' must be an integer, got {shown(value)}", where)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _check_float(key, value, where)
        if isinstance(value, str):  # YAML reads 5e-6 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                return _check_float(key, number if math.isfinite(number) else value, where)
        raise _Mismatch(f"'{key}' must be a number, got {shown(value)}", where)
    if tp is str:
        if isinstance(value, str):
            return _check_text(key, value, where)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 10**40:
            return str(value)
        raise _Mismatch(f"'{key}' must be a string, got {shown(value)}", where)
    return value


# A config is a few dozen values: more than this many (YAML aliases can expand 758 bytes into billions,
# and any error message or copy of them into gigabytes) is refused before anything looks at them.
MAX_CONFIG_VALUES = 100_000


class _Refused(yaml.constructor.ConstructorError):
    """Valid YAML that ``_StrictLoader`` refuses (a key twice, an integer too long)."""


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML keeps the last one silently) and
    integers longer than Python converts (a bare ValueError otherwise)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: set[tuple[str, str]] = set()
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    name = (key_node.tag, key_node.value)
                    if name in seen:
                        raise _Refused(None, None, f"key {shown(key_node.value)} appears twice", key_node.start_mark)
                    seen.add(name)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        limit = sys.get_int_max_str_digits()
        digits = sum(c.isdigit() for c in str(node.value))
        if limit and digits > limit:
            raise _Refused(None, None, f"a number with {digits} digits (at most {limit} are read)", node.start_mark)
        return super().construct_yaml_int(node)


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


def _count_values(value: Any, limit: int) -> int:
    """How many values ``value`` holds, counting aliases as often as they are used; stops past ``limit``
    (so a recursive alias or an alias bomb costs no more than ``limit`` steps)."""
    count, stack = 0, [value]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            stack.extend(item)
    return count


def _yaml_problem(e: BaseException) -> tuple[str, int | None]:
    """(problem, 1-based line or None) of an exception from ``_StrictLoader``."""
    if isinstance(e, yaml.YAMLError):
        mark = getattr(e, "problem_mark", None)
        return getattr(e, "problem", None) or "invalid YAML", (mark.line + 1 if mark is not None else None)
    if isinstance(e, RecursionError):
        return "nested too deeply", None
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__), None


def load_yaml_value(text: str, where: str | None = None) -> Any:
    """YAML text to a value, strictly (see ``_StrictLoader``) and bounded (``MAX_CONFIG_VALUES``)."""
    try:
        value = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as e:
        problem, line = _yaml_problem(e)
        at = f"{where}:{line}" if where and line else where
        raise PreftuneError(f"invalid YAML: {problem}", at) from None
    if _count_values(value, MAX_CONFIG_VALUES) > MAX_CONFIG_VALUES:
        raise PreftuneError(
            f"the YAML holds more than {MAX_CONFIG_VALUES} values once its aliases (*name) are expanded; a config "
            "is a few dozen keys",
            where,
        )
    return value


def parse_override(item: str) -> tuple[str, Any]:
    """``key=value`` from the command line; the value is read as YAML (numbers, lists, booleans)."""
    if "=" not in item:
        hint = ""
        if item.lower().endswith((".yaml", ".yml")):
            hint = "; the config file comes first: preftune train CONFIG [KEY=VALUE ...]"
        raise PreftuneError(f"override {shown(item)} must look like key=value{hint}")
    key, _, text = item.partition("=")
    try:
        value = yaml.load(text, Loader=_StrictLoader) if text else ""  # noqa: S506 - a SafeLoader
    except _Refused as e:
        raise PreftuneError(f"override for '{key.strip()}': {e.problem}") from None
    except yaml.YAMLError:
        value = text  # not YAML: the text as it is
    except (ValueError, TypeError, RecursionError) as e:
        raise PreftuneError(f"override for '{key.strip()}': invalid YAML: {_yaml_problem(e)[0]}") from None
    if _count_values(value, MAX_CONFIG_VALUES) > MAX_CONFIG_VALUES:
        raise PreftuneError(f"override for '{key.strip()}' holds more than {MAX_CONFIG_VALUES} values")
    return key.strip(), value
