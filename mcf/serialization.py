"""Reading checkpoint files without ever running code: the one place mcf unpickles anything.

A ``.pt``/``.pth`` file is a pickle, and a pickle can name any function to call while it is read.
Every file mcf or DeepSpeed reads back — DeepSpeed's model states and ZeRO/bf16 optimizer shards,
``mcf_state.pt``, ``rank_*.pt``, ``online_fp32.pt``, ``zero_to_fp32`` consolidation, ``mcf export``
/ ``export-fp32`` inputs, ``model.init_from``, teachers, downstream weights — goes through
:func:`safe_load`: PyTorch's weights-only unpickler (tensors, plain containers and scalars) plus
:data:`SAFE_GLOBALS`, exactly the other types those files hold:

* what DeepSpeed 0.19.8 writes (found by saving real checkpoints at ZeRO 0-3 in fp32 and bf16 and
  listing what the weights-only unpickler rejects; fp16 adds the dynamic loss scaler): the loss
  scalers, the ZeRO stage enum and the fragment addresses of the ZeRO optimizer shards;
* ``argparse.Namespace``, which the MAE family (MAE, the paper's release, DINO, ...) stores under
  ``args``; its attributes must be plain values (checked after loading), so a Namespace cannot smuggle
  in anything else.

Constructing any of these calls no user code (plain attribute containers, an int enum, a dataclass).
A file holding anything else is refused with :class:`~mcf.errors.UnsafeCheckpointError`, one line
naming the file and the offending type; an unreadable, truncated or foreign file with
:class:`~mcf.errors.CheckpointError`.

DeepSpeed reads its own files with ``torch.load`` and weights-only off (full, code-running
unpickling); wrap every DeepSpeed read (``engine.load_checkpoint``,
``get_fp32_state_dict_from_zero_checkpoint``, ...) in :func:`safe_torch_load`, which makes
``torch.load`` itself the safe loader for its duration::

    from mcf.serialization import safe_load, safe_torch_load

    state = safe_load(step_dir / "mcf_state.pt")        # any file of ours
    with safe_torch_load():                              # any DeepSpeed call that reads files
        engine.load_checkpoint(str(root), tag=tag)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import pickle
import pickletools
import re
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

from mcf.errors import CheckpointError, UnsafeCheckpointError

_TORCH_LOAD = torch.load  # the real loader, kept before safe_torch_load() replaces torch.load
PLAIN = (type(None), bool, int, float, complex, str, bytes)


@functools.cache
def _deepspeed_globals() -> tuple[Any, ...]:
    """The non-tensor types inside DeepSpeed 0.19.8's checkpoint files (empty without DeepSpeed)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return ()
    # LossScaler (ZeRO 1-3, bf16 and fp32): optimizer shard 'loss_scaler'; DynamicLossScaler: the
    # same under fp16; ZeroStageEnum: 'zero_stage'; fragment_address(numel, start): ZeRO 1/2 and bf16
    # 'param_slice_mappings'.
    return (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)


def safe_globals() -> list[Any]:
    """Everything :func:`safe_load` accepts beyond PyTorch's own weights-only set."""
    return [*_deepspeed_globals(), argparse.Namespace]


_ALLOW_LOCK = threading.RLock()  # torch keeps its allowlist in one process-wide set


@contextlib.contextmanager
def _allowlisted() -> Iterator[None]:
    """:func:`safe_globals` added to torch's allowlist for the block, then exactly those removed
    again (an entry the caller had added already stays); serialised across threads."""
    with _ALLOW_LOCK:
        present = set(torch.serialization.get_safe_globals())
        with torch.serialization.safe_globals([g for g in safe_globals() if g not in present]):
            yield


def _name(f: Any) -> str:
    return str(f) if isinstance(f, (str, os.PathLike)) else getattr(f, "name", "<stream>")


_UNSAFE_PATTERNS = (  # what the weights-only unpickler says when it meets something it will not build
    re.compile(r"GLOBAL (\S+)"),
    re.compile(r"reduce for unrecognized function (.+?)(?: which belongs|$)", re.M),
    re.compile(r"but got (<class '[^']+'>)"),
    re.compile(r"(Unsupported operand \d+)"),
)


def _offending(message: str) -> str | None:
    for pattern in _UNSAFE_PATTERNS:
        m = pattern.search(message)
        if m:
            return m.group(1).rstrip(".")
    return None


def refusal(path: Any, found: str) -> UnsafeCheckpointError:
    """The one-line error for a file that holds something other than weights (``found`` names it)."""
    return UnsafeCheckpointError(
        f"refusing to load {_name(path)}: it holds {found} (only tensors, plain containers and values, and the types "
        "DeepSpeed writes are loaded: unpickling anything else could run code); if you made this file and trust it, "
        "re-save just its weights (a dict of tensors, e.g. torch.save(ckpt['model'], 'weights.pth'), or .safetensors)")


def _first_line(e: BaseException) -> str:
    """The first sentence of an exception's message (torch's run to many lines of advice)."""
    text = str(e).strip().splitlines()
    first = text[0].split(". ")[0].rstrip(".") if text else type(e).__name__
    return first[:200]


MAX_DEPTH = 256  # containers nested deeper than this are refused (DeepSpeed's files nest < 10 deep)
MAX_OBJECTS = 50_000_000  # distinct containers and values walked at most (a ViT-g ZeRO shard holds ~10^4)


def _walk(obj: Any, path: Any, *, keys: bool) -> Iterator[Any]:
    """Every distinct object reachable from ``obj`` through dicts, lists, tuples and sets, each once.

    Linear in the number of distinct objects: a container shared many times (``a = [a, a]`` nested 60
    deep is 2**60 paths but 61 lists) is walked once (memo by ``id``). Bounded: nesting deeper than
    :data:`MAX_DEPTH` or more than :data:`MAX_OBJECTS` objects is refused with one line. ``keys``:
    walk dict keys too.
    """
    seen: set[int] = set()
    todo: list[tuple[Any, int]] = [(obj, 0)]
    while todo:
        x, depth = todo.pop()
        if isinstance(x, (dict, list, tuple, set, frozenset, argparse.Namespace)):
            if id(x) in seen:
                continue
            seen.add(id(x))
            if len(seen) > MAX_OBJECTS:
                raise CheckpointError(f"refusing to load {_name(path)}: it holds more than {MAX_OBJECTS:,} containers")
            if depth >= MAX_DEPTH:
                raise CheckpointError(f"refusing to load {_name(path)}: its containers nest more than {MAX_DEPTH} deep")
        yield x
        if isinstance(x, dict):
            items = [*x.keys(), *x.values()] if keys else x.values()
            todo.extend((v, depth + 1) for v in items)
        elif isinstance(x, (list, tuple, set, frozenset)):
            todo.extend((v, depth + 1) for v in x)


def _check_namespaces(obj: Any, path: Any) -> None:
    """Every argparse.Namespace in ``obj`` must hold only plain values (MAE's ``args`` do)."""
    for x in _walk(obj, path, keys=False):
        if isinstance(x, argparse.Namespace):
            for key, value in vars(x).items():
                bad = _non_plain(value, path)
                if bad is not None:
                    raise refusal(
                        path, f"an argparse.Namespace whose '{key}' is a {bad} (a Namespace may hold only plain values)"
                    )


def _non_plain(value: Any, path: Any = "<object>") -> str | None:
    """The type name of the first non-plain value inside ``value`` (None when all plain)."""
    for x in _walk(value, path, keys=True):
        if isinstance(x, PLAIN) or isinstance(x, (list, tuple, set, frozenset)) or type(x) is dict:
            continue
        return type(x).__qualname__
    return None


def safe_load(f: str | os.PathLike | IO[bytes], map_location: Any = "cpu", *, mmap: bool | None = None) -> Any:
    """``torch.load`` that can never run code: the weights-only unpickler plus :func:`safe_globals`.

    Args:
        f: a path or a binary file object.
        map_location: as ``torch.load`` (default: CPU).
        mmap: as ``torch.load`` (memory-map the tensors of a zip checkpoint).

    Raises:
        UnsafeCheckpointError: the file holds a type outside the allowlist (named in the message).
        CheckpointError: missing, unreadable, truncated or not a PyTorch file.
    """
    name = _name(f)
    if isinstance(f, (str, os.PathLike)) and os.path.isfile(f) and not zipfile.is_zipfile(f):
        check_file(f)  # a raw or legacy pickle: name what it would build before the unpickler refuses it
    try:
        with _allowlisted():
            obj = _TORCH_LOAD(f, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = _offending(str(e))
        if found is not None:
            if found.startswith("Unsupported operand"):
                found = f"a pickle instruction the weights-only loader refuses ({found})"
            raise refusal(name, found) from None
        raise CheckpointError(f"cannot read {name}: damaged or not a PyTorch checkpoint ({_first_line(e)})") from None
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file not found: {name}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{name} is a directory, not a checkpoint file") from None
    except PermissionError:
        raise CheckpointError(f"cannot read {name}: permission denied") from None
    except EOFError:
        raise CheckpointError(f"cannot read {name}: the file is empty or cut short") from None
    except (
        RuntimeError, OSError, ValueError, TypeError, KeyError, AttributeError, IndexError, MemoryError, OverflowError,
        UnicodeDecodeError, zipfile.BadZipFile,
    ) as e:  # what torch raises on damaged zips and storages
        raise CheckpointError(f"cannot read {name}: damaged or not a PyTorch checkpoint ({_first_line(e)})") from None
    _check_namespaces(obj, name)
    return obj


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def _pickle_globals(stream: IO[bytes]) -> set[str]:
    """The globals one pickle names, from its opcodes (``pickletools``: nothing is built or called).

    ``STACK_GLOBAL`` (protocol 4+, which torch.save never writes and the weights-only loader refuses)
    is reported as module.name when both strings were pushed just before it.
    """
    names: set[str] = set()
    strings: list[str] = []
    for op, arg, _ in pickletools.genops(stream):
        if op.name in ("GLOBAL", "INST"):
            names.add(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            names.add(".".join(strings[-2:]) if len(strings) >= 2 else "a global named at load time")
        elif op.name in ("EXT1", "EXT2", "EXT4"):  # a global by copyreg extension code: never written by torch.save
            names.add(f"the copyreg extension global #{arg}")
        elif op.name in _STRING_OPS:
            strings.append(str(arg))
        elif op.name == "STOP":
            break
    return names


def _allowed_global_names() -> set[str]:
    """The names :func:`safe_load` accepts: torch's own, the caller's additions and :func:`safe_globals`."""
    from torch import _weights_only_unpickler as wou

    ours = {f"{g.__module__}.{g.__qualname__}" for g in safe_globals()}
    return set(wou._get_allowed_globals()) | set(wou._get_user_allowed_globals()) | ours


def unsafe_globals(path: str | os.PathLike) -> list[str]:
    """The globals a checkpoint file's pickle names outside the allowlist, read without unpickling.

    A quick look (only the pickle is read, not the tensors of a zip checkpoint) to refuse a tampered
    checkpoint before any rank starts loading it; :func:`safe_load` remains the guard. A file that is
    not a zip checkpoint (a raw pickle, torch's legacy format) has its first pickle scanned.

    Raises:
        CheckpointError: the file cannot be read (missing, damaged, truncated).
    """
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                raise CheckpointError(f"cannot read {p}: the file is empty")
            if zipfile.is_zipfile(fh):
                with zipfile.ZipFile(fh) as z:
                    pkl = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
                    if len(pkl) != 1:
                        raise CheckpointError(
                            f"cannot read {p}: a zip file but not a PyTorch checkpoint (no single data.pkl)"
                        )
                    names = _pickle_globals(io.BytesIO(z.read(pkl[0])))
            else:
                fh.seek(0)
                if fh.read(4) == b"PK\x03\x04":
                    raise CheckpointError(
                        f"cannot read {p}: a zip checkpoint cut short or damaged (no zip directory at its end)"
                    )
                fh.seek(0)
                names = _pickle_globals(fh)
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"cannot read {p}: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - zip or pickle so damaged that reading its opcodes fails
        raise CheckpointError(f"cannot read {p}: damaged or not a PyTorch checkpoint ({_first_line(e)})") from None
    return sorted(names - _allowed_global_names())


def check_file(path: str | os.PathLike) -> None:
    """Raise :class:`UnsafeCheckpointError` when :func:`unsafe_globals` finds anything."""
    found = unsafe_globals(path)
    if found:
        raise refusal(path, ", ".join(found[:3]))


@contextlib.contextmanager
def safe_torch_load() -> Iterator[None]:
    """Within the block, ``torch.load`` is :func:`safe_load` whatever its caller asks.

    DeepSpeed's checkpoint engine, ``zero_to_fp32`` and its ZeRO-3 helpers call
    ``torch.load`` with weights-only off (full unpickling); this routes every such call through the
    allowlist.
    Re-entrant; the original ``torch.load`` is restored on exit, also after an error.
    """
    if getattr(torch.load, "_mcf_safe", False):  # already inside
        yield
        return
    previous = torch.load

    def load(f: Any, map_location: Any = None, pickle_module: Any = None, *, weights_only: Any = None,  # noqa: ARG001
             mmap: bool | None = None, **pickle_load_args: Any) -> Any:
        return safe_load(f, map_location=map_location, mmap=mmap)

    load._mcf_safe = True  # type: ignore[attr-defined]
    torch.load = load
    try:
        yield
    finally:
        torch.load = previous
