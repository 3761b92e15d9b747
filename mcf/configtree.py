"""Machinery for a tree of config dataclasses: documented fields, dotted overrides, YAML I/O.

Every section is a ``@dataclass(kw_only=True)`` whose fields are declared with :func:`field`, which
stores the help text in the field's metadata, so ``--help`` and error messages can quote it. A
section validates itself in ``__post_init__`` and raises :class:`~mcf.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from mcf.errors import ConfigError

_MISSING = dataclasses.MISSING
MAX_YAML_VALUES = 100_000  # scalars, lists and mappings of one YAML document, aliases expanded
_SHORT = reprlib.Repr()  # keyword arguments need Python 3.12
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict = 2, 6, 6, 6
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 80, 80, 80


def short(value: Any) -> str:
    """``repr(value)``, abbreviated for one-line errors (a list of a million items stays a line)."""
    return _SHORT.repr(value)


def safe_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load(text)``, refusing documents that only aliases make huge or cyclic.

    Anchors and aliases stay usable, but an alias repeats a node by reference, so a few lines can
    stand for billions of values ("billion laughs") or contain themselves (``&a [*a]``); either
    would hang or exhaust whatever walks the config later. Raises :class:`ConfigError` naming ``where``.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply") from None
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any) -> int:  # values below node with aliases expanded; memoised per object
        if not isinstance(node, (list, dict)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError(f"{where} contains itself through a YAML alias")
        active.add(key)
        items = list(node.keys()) + list(node.values()) if isinstance(node, dict) else node
        total = 1
        for item in items:
            total += size(item)
            if total > MAX_YAML_VALUES:
                raise ConfigError(f"{where} expands to more than {MAX_YAML_VALUES} values through YAML aliases")
        active.discard(key)
        sizes[key] = total
        return total

    try:
        size(data)
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply") from None
    return data


def field(default: Any = _MISSING, *, help: str, default_factory: Any = _MISSING, **metadata: Any) -> Any:
    """A dataclass field with a help string (shown by ``mcf config`` and in errors); ``metadata`` holds more
    (e.g. how a command builds a flag of it)."""
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"help": help, **metadata})
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def flat_keys(cls: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    """All dotted leaf keys of a config class, mapped to their dataclass fields."""
    out: dict[str, dataclasses.Field] = {}
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if _is_dataclass_type(tp):
            out.update(flat_keys(tp, key + "."))
        else:
            out[key] = f
    return out


def _unknown_key_error(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    if not close:
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in valid if k.rsplit(".", 1)[-1] == leaf][:3]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise a ConfigError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        # "none" means None for optional numbers, tuples…; a string field keeps the word itself
        if isinstance(value, str) and value.lower() == "none" and type(None) in args and str not in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"invalid value for '{key}': {short(value)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"invalid value for '{key}': {short(value)} (choose from {', '.join(map(str, args))})")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = safe_yaml(value, f"the value of '{key}'") if value.strip().startswith("[") else [
                v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"invalid value for '{key}': expected a list, got {short(value)}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, key) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"invalid value for '{key}': expected true/false, got {short(value)}")
    if tp is int:
        return _check_int(_to_int(value, key), key)
    if tp is float:
        number = _to_float(value, key)
        if not math.isfinite(number):  # nan/inf pass every comparison-based check, then poison the run
            raise ConfigError(f"invalid value for '{key}': {short(value)} (must be a finite number)")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"invalid value for '{key}': expected a string, got {short(value)}")
    return value


INT_MAX = 2**63 - 1  # what torch and numpy take as an integer


def _to_int(value: Any, key: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"invalid value for '{key}': expected an integer, got {short(value)}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    raise ConfigError(f"invalid value for '{key}': expected an integer, got {short(value)}")


def _check_int(value: int, key: str) -> int:
    if not -INT_MAX - 1 <= value <= INT_MAX:
        raise ConfigError(f"invalid value for '{key}': {value} is out of the 64-bit integer range")
    return value


def _to_float(value: Any, key: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"invalid value for '{key}': {short(value)} (must be a finite number)") from None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"invalid value for '{key}': expected a number, got {short(value)}")


def from_dict(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build a config dataclass from a (possibly partial) nested dict; unknown keys raise."""
    data = dict(data or {})
    hints = _field_types(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        if k not in names:
            valid = list(flat_keys(cls)) if prefix == "" else [prefix + n for n in names]
            raise _unknown_key_error(prefix + str(k), valid)
        tp = hints[k]
        if _is_dataclass_type(tp):
            if v is not None and not isinstance(v, dict):
                raise ConfigError(f"'{prefix}{k}' is a section; set its keys, e.g. {prefix}{k}.<key>=...")
            kwargs[k] = from_dict(tp, v, prefix + k + ".")
        else:
            kwargs[k] = _coerce(v, tp, prefix + k)
    for name in names:
        if name not in kwargs and _is_dataclass_type(hints[name]):
            kwargs[name] = from_dict(hints[name], {}, prefix + name + ".")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if prefix and not str(e).startswith(prefix):
            raise ConfigError(f"{prefix.rstrip('.')}: {e}") from None
        raise


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts/lists (tuples become lists), YAML-safe."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: values of ``update`` win; nested dicts merge."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str, cls: type) -> dict[str, Any]:
    """``"a.b=1"`` → ``{"a": {"b": 1}}``, checking the key exists in ``cls``."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    valid = flat_keys(cls)
    if key not in valid:
        raise _unknown_key_error(key, list(valid))
    value: Any = safe_yaml(raw, f"the value of '{key}'") if raw.strip() != "" else ""
    if value is None and raw.strip().lower() not in ("null", "~"):
        value = raw
    node: dict[str, Any] = {}
    cur = node
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return node


def resolve(cls: type, base: dict[str, Any] | None = None, *, env: typing.Sequence[str] = (),
            flags: dict[str, Any] | None = None, overrides: typing.Sequence[str] = ()) -> Any:
    """The one resolution order of every ``mcf`` command's config (later wins), validated once at the end:
    the dataclass defaults, ``base`` (a preset / YAML dict), ``env`` (``key=value`` texts from the
    environment), ``flags`` (a nested dict of the command's dedicated flags), then ``overrides``
    (``--set key=value``). Keys are checked against ``cls``; a missing required key is a ConfigError."""
    data: dict[str, Any] = dict(base or {})
    for text in env:
        data = merge(data, parse_override(text, cls))
    if flags:
        data = merge(data, flags)
    for text in overrides:
        data = merge(data, parse_override(text, cls))
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is _MISSING and f.default_factory is _MISSING and f.name not in data]
    if missing:
        raise ConfigError(f"missing config key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    return from_dict(cls, data)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    data = safe_yaml(p.read_text(), f"config file {p}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return data


def describe(cls: type) -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every leaf, for documentation and ``mcf config --list``."""
    rows = []
    defaults = to_dict(from_dict(cls, {}))
    for key, f in flat_keys(cls).items():
        cur: Any = defaults
        for part in key.split("."):
            cur = cur[part]
        rows.append((key, cur, f.metadata.get("help", "")))
    return rows


REQUIRED = "<required>"


def describe_fields(cls: type) -> list[tuple[str, Any, str]]:
    """(dotted key, declared default or :data:`REQUIRED`, help) for every leaf, read from the field declarations
    without building the config: for a config with required keys or defaults filled from other keys (finetune's
    ``None`` = the protocol's value)."""
    rows = []
    for key, f in flat_keys(cls).items():
        if f.default is not _MISSING:
            default = f.default
        elif f.default_factory is not _MISSING:
            default = to_dict(f.default_factory())
        else:
            default = REQUIRED
        rows.append((key, list(default) if isinstance(default, tuple) else default, f.metadata.get("help", "")))
    return rows


# -- command-line flags declared in the field metadata ------------------------------------------------
# A leaf whose metadata holds ``flag`` (True: ``--<name-with-dashes>``, or the flag's own name) is set by that
# flag; the flag is sugar for the key, so ``--set key=value`` reaches the same value. More metadata:
# ``const`` (a switch that sets the key to this value), ``bool`` (``--x/--no-x``), ``type`` and ``choices`` (else
# read from the annotation), ``metavar``, ``none_flag`` (the flag value that means None, e.g. 0 = "the model's
# own"), ``flag_help`` (the flag's help, where it differs from the key's).


def flag_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The leaves of ``cls`` that declare a command-line flag, by dotted key."""
    return {k: f for k, f in flat_keys(cls).items() if f.metadata.get("flag")}


def flag_name(key: str, f: dataclasses.Field) -> str:
    flag = f.metadata["flag"]
    return flag if isinstance(flag, str) else "--" + key.rsplit(".", 1)[-1].replace("_", "-")


def flag_dest(key: str, f: dataclasses.Field) -> str:
    """The argparse destination of a key's flag (``--one-nic-per-ring`` → ``one_nic_per_ring``)."""
    return flag_name(key, f).lstrip("-").replace("-", "_")


def flag_value(f: dataclasses.Field, value: Any) -> Any:
    """A key's value as its flag writes it: a switch thrown or not, a comma list, ``none_flag`` for None."""
    meta = f.metadata
    if "const" in meta:
        return value == meta["const"]
    if value is None and "none_flag" in meta:
        return meta["none_flag"]
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return value


def _flag_type(tp: Any) -> tuple[Any, tuple | None]:
    """(argparse type, choices) of an annotation: numbers and Literals are checked by argparse; everything
    else (lists as comma text) is handed to the resolution as text."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        tp = args[0]
    if typing.get_origin(tp) is typing.Literal:
        return str, typing.get_args(tp)
    return (tp if tp in (int, float) else str), None


def add_flags(parser: Any, cls: type, *, skip: typing.Collection[str] = (), defaults: dict[str, Any] | None = None
              ) -> None:
    """Add the flags that ``cls``'s fields declare to an argparse parser (none of ``skip``'s keys). Each one defaults
    to None (unset: the key keeps its config value); its help names the key and its default (``defaults`` where the
    command's base config differs from the declared one)."""
    import argparse

    hints: dict[str, Any] = {}
    for key in flat_keys(cls):  # the annotation of each dotted key, read from its own section
        owner: Any = cls
        for part in key.split(".")[:-1]:
            owner = _field_types(owner)[part]
        hints[key] = _field_types(owner)[key.rsplit(".", 1)[-1]]
    declared = {key: default for key, default, _ in describe_fields(cls)}
    for key, f in flag_fields(cls).items():
        if key in skip:
            continue
        meta = f.metadata
        default = (defaults or {}).get(key, declared[key])
        shown = flag_value(f, default)
        if "const" in meta or "flag_help" in meta:  # a switch, or a flag whose meaning is its own
            text = f"{meta.get('flag_help', meta['help'])} [{key}]"
        else:
            text = f"{meta['help']} [{key}; default: {shown}]"
        text = text.replace("%", "%%")
        name, dest = flag_name(key, f), flag_dest(key, f)
        if "const" in meta:
            parser.add_argument(name, dest=dest, action="store_const", const=meta["const"], default=None, help=text)
        elif meta.get("bool"):
            parser.add_argument(name, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            tp, choices = _flag_type(hints[key])
            parser.add_argument(name, dest=dest, type=meta.get("type", tp), choices=meta.get("choices", choices),
                                metavar=meta.get("metavar"), default=None, help=text)


def flags_given(cls: type, args: Any, *, skip: typing.Collection[str] = ()) -> dict[str, Any]:
    """The nested dict of the keys that ``cls``'s flags set in a parsed argparse namespace (the ``flags`` of
    :func:`resolve`); a flag's ``none_flag`` value becomes None."""
    out: dict[str, Any] = {}
    for key, f in flag_fields(cls).items():
        value = getattr(args, flag_dest(key, f), None)
        if key in skip or value is None:
            continue
        if "none_flag" in f.metadata and value == f.metadata["none_flag"]:
            value = None
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out
