"""Declared settings: one `Param` per key, checked strictly.

Every settings section of the YAML (dataset, runner, phase entries and the model's
`hyper_parameters`) is described by a tuple of `Param`s. The declaration is the single
place where a key's type, default and meaning live: validation, defaults and README's
key reference all come from it.

Dotted names ("optimizer.learning_rate") declare nested mappings in the YAML:

    optimizer:
      learning_rate: 0.05
"""

import difflib
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .errors import ConfigError


class _Required:
    def __repr__(self):
        return "(required)"


REQUIRED = _Required()

# type name -> how README shows it
TYPE_NAMES = {
    "int": "int",
    "float": "float",
    "bool": "bool",
    "str": "string",
    "path": "path",
    "list[int]": "list of int",
    "list[float]": "list of float",
    "list[str]": "list of string",
    "names": "name or list of names",
}


@dataclass(frozen=True)
class Param:
    """One setting: its dotted name, type, default and a one-line meaning."""

    name: str
    type: str
    default: Any = REQUIRED
    help: str = ""
    choices: tuple = ()
    min: Optional[float] = None  # inclusive lower bound (numbers, list elements)
    max: Optional[float] = None  # inclusive upper bound
    gt: Optional[float] = None  # exclusive lower bound

    def __post_init__(self):
        if self.type not in TYPE_NAMES:
            raise ValueError(f"Param {self.name}: unknown type {self.type!r}")

    @property
    def required(self):
        return self.default is REQUIRED

    def describe_type(self):
        text = TYPE_NAMES[self.type]
        if self.choices:
            text += " (" + " | ".join(str(c) for c in self.choices) + ")"
        return text


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return (isinstance(value, (int, float))) and not isinstance(value, bool)


# numpy and Paddle hold ints in int64: a larger one ends in an OverflowError deep inside them, so an int
# setting with no tighter declared bound is held to this one.
INT64_MAX = 2**63 - 1


def _check_bounds(param, value, key):
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, f"must be a finite number, got {value!r}")
    if param.min is not None and value < param.min:
        raise ConfigError(key, f"must be >= {param.min}, got {value!r}")
    if param.max is not None and value > param.max:
        raise ConfigError(key, f"must be <= {param.max}, got {value!r}")
    if param.gt is not None and not value > param.gt:
        raise ConfigError(key, f"must be > {param.gt}, got {value!r}")
    if _is_int(value) and param.max is None and abs(value) > INT64_MAX:
        raise ConfigError(key, f"must be <= {INT64_MAX} in size (a 64-bit integer), got {value!r}")


def check_value(param: Param, value: Any, key: str) -> Any:
    """Return `value` normalised to the declared type, or raise ConfigError naming `key`."""
    kind = param.type
    expected = TYPE_NAMES[kind]
    if kind == "int":
        if not _is_int(value):
            raise ConfigError(key, f"expected an int, got {value!r}")
        _check_bounds(param, value, key)
    elif kind == "float":
        if not _is_number(value):
            raise ConfigError(key, f"expected a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(key, f"{value!r} is too large for a float") from None
        _check_bounds(param, value, key)
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
    elif kind in ("str", "path"):
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a {expected}, got {value!r}")
    elif kind.startswith("list["):
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a {expected} like [1, 2], got {value!r}")
        element = kind[5:-1]
        checked = []
        for i, item in enumerate(value):
            sub = Param(param.name, element, min=param.min, max=param.max, gt=param.gt, choices=param.choices)
            checked.append(check_value(sub, item, f"{key}[{i}]"))
        return checked
    elif kind == "names":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, f"expected a name or a list of names, got {value!r}")
        return list(value)
    if param.choices and value not in param.choices:
        raise ConfigError(key, f"{value!r} is not one of: {', '.join(str(c) for c in param.choices)}")
    return value


def unknown_key_error(key: str, name: str, allowed: Sequence[str], hint: str = "") -> ConfigError:
    """A ConfigError for an unknown key that lists the allowed keys and a likely typo fix."""
    close = difflib.get_close_matches(name, list(allowed), n=1)
    message = "unknown key"
    if close:
        message += f" (did you mean {close[0]!r}?)"
    if hint:
        message += f"; {hint}"
    message += f"; allowed here: {', '.join(sorted(allowed))}"
    return ConfigError(key, message)


def validate_section(values: Any, params: Sequence[Param], prefix: str, hints: Optional[dict] = None) -> dict:
    """Check a (possibly nested) mapping against `params`; return {dotted name: value}.

    Unknown keys, wrong types and missing required keys raise ConfigError naming the
    full dotted key (`prefix` + name). Absent optional keys get their declared default.
    `hints` maps retired key names to a sentence telling what replaced them.
    """
    by_name = {p.name: p for p in params}
    groups = {p.name.rsplit(".", i)[0] for p in params for i in range(1, p.name.count(".") + 1)}
    hints = hints or {}
    result = {}

    def walk(mapping, group):
        where = f"{prefix}.{group}" if group else prefix
        if not isinstance(mapping, dict):
            raise ConfigError(where, f"expected a mapping of keys, got {mapping!r}")
        for name, value in mapping.items():
            if not isinstance(name, str):
                raise ConfigError(where, f"keys must be names, got {name!r}")
            dotted = f"{group}.{name}" if group else name
            key = f"{prefix}.{dotted}" if prefix else dotted
            if dotted in by_name:
                result[dotted] = check_value(by_name[dotted], value, key)
            elif dotted in groups:
                walk(value, dotted)
            else:
                level = [n[len(group) + 1:] if group else n for n in list(by_name) + list(groups)
                         if (n.startswith(group + ".") if group else True)]
                level = sorted({n.split(".")[0] for n in level})
                raise unknown_key_error(key, name, level, hints.get(dotted, ""))

    walk(values if values is not None else {}, "")
    for param in params:
        if param.name not in result:
            if param.required:
                key = f"{prefix}.{param.name}" if prefix else param.name
                raise ConfigError(key, f"missing; {param.help or 'this key is required'}")
            result[param.name] = param.default
    return result


def reference_table(params: Sequence[Param]) -> str:
    """A Markdown table of `params` (README's key reference is kept identical to this)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for p in params:
        default = "(required)" if p.required else _show(p.default)
        cells = (f"`{p.name}`", p.describe_type(), default, p.help)
        # a bare "|" (as in "cpu | gpu") would end the Markdown cell
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def _show(value):
    if isinstance(value, str):
        return f'`"{value}"`' if value else '`""`'
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"
