"""Can the Triton kernels run here, and which attention path should ``attention.backend=auto`` take?

``triton_status`` answers the first question (with a reason a user can act on). ``auto_candidate``
the second, from measurements only: the attention table (``attention_table.json`` beside this file,
plus a per-user cache that ``mcf bench attention --table`` writes) holds, per host class (CPU ISA or
GPU name, with the torch version), dtype, head dimension and sequence length, the measured forward +
backward time of each candidate path; ``auto`` takes the fastest at the nearest measured length.
Where the table has no row for the host, dtype and head dimension, a documented default applies
(:func:`default_candidate`). ``prefer_triton`` is the older GPU-only rule (``TRITON_FASTER``), kept
as the default on a GPU the table does not know.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mcf.kernels import _triton_utils as tu

from mcf.fileio import mcf_cache_dir
from mcf.measure import cpu_isa, native_bf16  # noqa: F401 - native_bf16 re-exported: the table's host classes

# Largest head dimension the attention kernels take (padded to a power of two inside).
MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class TritonFaster:
    """One measured shape range where the Triton attention beat SDPA (forward + backward).

    Rows come from ``python benchmarks/bench_attention.py --json OUT`` run on the GPU: it prints
    the rows in this form for every shape where Triton was at least ``--min-speedup`` faster.
    """

    device: str
    """Prefix of ``torch.cuda.get_device_name()``, e.g. ``"NVIDIA H100"``."""
    dtype: torch.dtype
    head_dim: int
    min_tokens: int
    """Sequence lengths (keys) from ``min_tokens`` to ``max_tokens`` inclusive."""
    max_tokens: int
    masked: bool
    """Whether the measurement used a key mask (SDPA then cannot use its flash kernel)."""
    speedup: float
    """SDPA time / Triton time, forward + backward, median of repeats."""
    source: str
    """Where the number comes from: benchmark JSON file, date, commit."""


# Empty on purpose. No GPU measurement of these kernels exists yet (they were written and tested
# under the Triton CPU interpreter only), and the flash-attention reports (issues #462, #591) find
# little or no gain over library attention below ~200 tokens, which is where MCF lives (50 and 197
# tokens). Until a benchmark run on a GPU shows a win, ``auto`` means SDPA everywhere. To fill it:
# run ``python benchmarks/bench_attention.py --json bench.json`` on the target GPU and paste the
# ``TritonFaster(...)`` rows it prints, naming the JSON file in ``source``.
TRITON_FASTER: tuple[TritonFaster, ...] = ()


def _device_of(where) -> torch.device:
    if where is None:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(where, torch.Tensor):
        return where.device
    return torch.device(where)


def triton_status(where: torch.Tensor | torch.device | str | None = None) -> tuple[bool, str]:
    """Whether the mcf Triton kernels can run on ``where``, and why (not).

    Args:
        where: a tensor (its device, dtype and, for ``[B, H, S, D]`` tensors, head dimension are
            checked), a device, or None for the default device.
    Returns:
        ``(ok, reason)``; ``reason`` says what runs (``ok``) or what to change (not ``ok``).
    """
    if tu.triton is None:
        return False, tu.TRITON_IMPORT_ERROR
    interpreted = tu.is_interpreted(tu.probe_kernel)
    device = _device_of(where)
    if isinstance(where, torch.Tensor):
        if where.dtype not in tu.SUPPORTED_DTYPES:
            return False, f"the Triton kernels take float32, bfloat16 or float16 tensors, not {where.dtype}"
        if where.dim() == 4 and where.shape[-1] > MAX_HEAD_DIM:
            return False, f"the Triton attention takes head dimensions up to {MAX_HEAD_DIM}, not {where.shape[-1]}"
    if device.type == "cpu":
        if interpreted:
            return True, "Triton interpreter (TRITON_INTERPRET=1) on CPU tensors: correct but slow, for tests"
        return False, ("the Triton kernels need a CUDA GPU; on the CPU they run only in Triton's interpreter, "
                       "with TRITON_INTERPRET=1 set before mcf.kernels is imported")
    if device.type != "cuda":
        return False, f"mcf has no Triton kernels for device type '{device.type}'"
    if interpreted:
        return True, "Triton interpreter (TRITON_INTERPRET=1): tensors are copied to the CPU, slow"
    if not torch.cuda.is_available():
        return False, "CUDA is not available to PyTorch"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if torch.version.hip is None:
        major, minor = torch.cuda.get_device_capability(index)
        if major < 8:
            return (
                False,
                f"the Triton kernels need compute capability >= 8.0 (bf16 tensor cores); {_device_name(index)} is "
                f"{major}.{minor}",
            )
        if isinstance(where, torch.Tensor) and where.dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return False, f"{_device_name(index)} does not support bfloat16"
    return True, f"Triton {tu.triton.__version__} on {_device_name(index)}"


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def prefer_triton(
    q: torch.Tensor, key_mask: torch.Tensor | None = None, table: tuple[TritonFaster, ...] | None = None
) -> bool:
    """The ``auto`` policy: use the Triton attention for this call?

    True only on a CUDA device where Triton can run and ``(device, dtype, head dim, tokens, masked)``
    falls in a measured row of ``table`` (default ``TRITON_FASTER``, empty until measured: see there).
    False on the CPU, where SDPA is always the choice.

    Args:
        q: ``[B, H, S, D]`` queries.
        key_mask: ``[B, S]`` bool key mask or ``[B]`` valid lengths, or None.
        table: the measured rows; for tests and for trying a fresh benchmark's rows.
    """
    if q.device.type != "cuda" or not triton_status(q)[0]:
        return False
    rows = TRITON_FASTER if table is None else table
    if not rows:
        return False
    name = _device_name(q.device.index if q.device.index is not None else torch.cuda.current_device())
    tokens, head_dim, masked = q.shape[-2], q.shape[-1], key_mask is not None
    return any(_row_matches(r, name, q.dtype, head_dim, tokens, masked) for r in rows)


def _row_matches(
    row: TritonFaster, device_name: str, dtype: torch.dtype, head_dim: int, tokens: int, masked: bool
) -> bool:
    return (
        device_name.startswith(row.device)
        and row.dtype == dtype
        and row.head_dim == head_dim
        and row.masked == masked
        and row.min_tokens <= tokens <= row.max_tokens
    )


# -- the measured attention table --------------------------------------------------------------------
# Candidate paths of ``auto`` (mcf.models.attention implements each): PyTorch's fused SDPA in the
# input dtype; the math reference (two matmuls and a softmax, in the input dtype); SDPA on inputs
# cast to fp32 and the output cast back (on CPUs whose bf16 flash kernel is slower than its fp32
# one); the mcf Triton kernel (GPUs only under ``auto``).
CANDIDATES = ("sdpa", "math", "sdpa_fp32", "triton")
TABLE_FILE = Path(__file__).with_name("attention_table.json")
TABLE_FORMAT = 1
def host_class(device: torch.device | str = "cpu") -> str:
    """The table's key for ``device``: ``cpu/<isa>/torch<major.minor>`` or ``cuda/<GPU name>/torch<major.minor>``."""
    device = torch.device(device)
    version = "torch" + ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda/{_device_name(index)}/{version}"
    if device.type == "cpu":
        return f"cpu/{cpu_isa()}/{version}"
    return f"{device.type}/{version}"


def user_table_path() -> Path:
    """The per-user cache of measured rows: ``$MCF_ATTENTION_TABLE``, else
    ``attention_table.json`` in mcf's cache (``$MCF_CACHE``, ``~/.cache/mcf``)."""
    explicit = os.environ.get("MCF_ATTENTION_TABLE")
    if explicit:
        return Path(explicit)
    return mcf_cache_dir() / "attention_table.json"


def read_table(path: Path) -> dict[str, Any]:
    """``{"format": 1, "hosts": {host_class: {"rows": [row, ...]}}}``; empty when ``path`` is missing.

    A row: ``dtype`` (``bfloat16`` ...), ``head_dim``, ``tokens``, ``masked``, ``B``, ``H``, ``ms``
    (candidate → median ms of forward + backward), ``source`` (command, date, commit)."""
    if not path.is_file():
        return {"format": TABLE_FORMAT, "hosts": {}}
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(
            f"attention table {path} is unreadable ({e}): delete it or rerun `mcf bench attention --table`"
        ) from None
    if not isinstance(table, dict) or table.get("format") != TABLE_FORMAT or not isinstance(table.get("hosts"), dict):
        raise ValueError(
            f"attention table {path} is not format {TABLE_FORMAT}: delete it or rerun `mcf bench attention --table`"
        )
    return table


def merge_rows(table: dict[str, Any], host: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``table`` with ``rows`` added under ``host``; a row of the same (dtype, head dim, tokens, masked) is replaced."""
    def key(r: dict[str, Any]) -> tuple:
        return r["dtype"], r["head_dim"], r["tokens"], r["masked"]

    old = table["hosts"].get(host, {}).get("rows", [])
    new_keys = {key(r) for r in rows}
    merged = [r for r in old if key(r) not in new_keys] + list(rows)
    hosts = {**table["hosts"], host: {"rows": sorted(merged, key=key)}}
    return {"format": TABLE_FORMAT, "hosts": hosts}


def write_table(path: Path, host: str, rows: list[dict[str, Any]]) -> Path:
    """Merge ``rows`` into the table at ``path`` (created with its folder) and return the path."""
    table = merge_rows(read_table(path), host, rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    _load_rows.cache_clear()
    _choice.clear()
    return path


@functools.cache
def _load_rows(host: str) -> tuple[dict[str, Any], ...]:
    """The rows for ``host``: the repository's table, overridden row by row by the user's cache."""
    rows: dict[tuple, dict[str, Any]] = {}
    for path in (TABLE_FILE, user_table_path()):
        for r in read_table(path)["hosts"].get(host, {}).get("rows", []):
            rows[(r["dtype"], r["head_dim"], r["tokens"], r["masked"])] = r
    return tuple(rows.values())


def default_candidate(device_type: str, dtype: torch.dtype) -> str:
    """``auto`` where the table has no row for the host, dtype and head dimension: on a CPU, fp32 SDPA
    for bf16/fp16 inputs (cast in and out; measured on AVX512-BF16 and AMX hosts, whose bf16 flash
    kernel was 3-10x slower than the fp32 one at MCF's shapes, and on an AVX2 host bf16 is emulated),
    SDPA otherwise; on a GPU SDPA (or Triton where ``TRITON_FASTER`` lists the shape)."""
    if device_type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return "sdpa_fp32"
    return "sdpa"


def pick(
    rows: tuple[dict[str, Any], ...] | list[dict[str, Any]], dtype: torch.dtype, tokens: int, head_dim: int,
    masked: bool, allowed: tuple[str, ...] = CANDIDATES,
) -> str | None:
    """The fastest ``allowed`` candidate of the row nearest to ``tokens`` (ratio of lengths) among
    ``rows`` of this dtype and head dimension (rows of the same masking first); None without rows."""
    name = str(dtype).replace("torch.", "")
    same = [r for r in rows if r["dtype"] == name and r["head_dim"] == head_dim]
    same = [r for r in same if r["masked"] == masked] or same
    for r in sorted(same, key=lambda r: abs(math.log(r["tokens"] / tokens))):
        timed = {c: ms for c, ms in r["ms"].items() if c in allowed and ms is not None}
        if timed:
            return min(timed, key=timed.get)
    return None


# (host, dtype, tokens, head dim, masked) -> candidate: one table lookup per shape and process
_choice: dict[tuple, str] = {}


def auto_candidate(q: torch.Tensor, key_mask: torch.Tensor | None = None) -> str:
    """``attention.backend=auto`` for ``q`` ``[B, H, S, D]``: the measured fastest candidate (see the module doc)."""
    return _auto_choice(
        q.device.type, q.device.index, q.dtype, int(q.shape[-2]), int(q.shape[-1]), key_mask is not None
    )


@torch.compiler.assume_constant_result  # traced code gets the answer as a constant: no graph break
def _auto_choice(
    device_type: str, index: int | None, dtype: torch.dtype, tokens: int, head_dim: int, masked: bool
) -> str:
    key = (device_type, index, dtype, tokens, head_dim, masked)
    choice = _choice.get(key)
    if choice is None:
        choice = _choice[key] = _resolve(torch.device(device_type, index), dtype, tokens, head_dim, masked)
    return choice


def _resolve(device: torch.device, dtype: torch.dtype, tokens: int, head_dim: int, masked: bool) -> str:
    allowed = ("sdpa", "math", "sdpa_fp32")
    triton_ok = (device.type == "cuda" and dtype in tu.SUPPORTED_DTYPES and head_dim <= MAX_HEAD_DIM
                 and triton_status(device)[0])
    if triton_ok:
        allowed += ("triton",)
    rows = _load_rows(host_class(device)) if device.type in ("cpu", "cuda") else ()
    chosen = pick(rows, dtype, tokens, head_dim, masked, allowed)
    if chosen is not None:
        return chosen
    if triton_ok:  # the older GPU rule: shapes listed in TRITON_FASTER
        index = device.index if device.index is not None else torch.cuda.current_device()
        if any(_row_matches(r, _device_name(index), dtype, head_dim, tokens, masked) for r in TRITON_FASTER):
            return "triton"
    return default_candidate(device.type, dtype)


def rows_from_bench(results: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """Table rows from ``benchmarks/bench_attention.py`` results: the fwd+bwd medians per shape.

    At several (B, H) for one (dtype, head dim, tokens, masked) the candidates' times are summed over them."""
    rows: dict[tuple, dict[str, Any]] = {}
    for r in results:
        if r["mode"] != "fwd+bwd" or r["backend"] not in CANDIDATES:
            continue
        key = (r["dtype"], r["D"], r["S"], r["masked"])
        row = rows.setdefault(key, {"dtype": r["dtype"], "head_dim": r["D"], "tokens": r["S"], "masked": r["masked"],
                                    "shapes": [], "ms": {}, "source": source})
        if [r["B"], r["H"]] not in row["shapes"]:
            row["shapes"].append([r["B"], r["H"]])
        ms = r.get("median_ms")
        prev = row["ms"].get(r["backend"], 0.0)
        row["ms"][r["backend"]] = None if ms is None or prev is None else round(prev + ms, 4)
    return list(rows.values())

