"""The checks and the summary of ``benchmarks/gpu_check.sh`` (one sub-command per job).

Each stage of the shell script runs its commands, then one of these sub-commands turns what they
left (a run folder, a log, a benchmark JSON) into the stage's result JSON on stdout and exits
non-zero when the stage's claim does not hold. ``summary`` gathers every stage into one JSON and a
table. Only the standard library, torch and mcf are imported, and mcf only where a check needs it.

    python benchmarks/gpu_check.py imports OUT.json
    python benchmarks/gpu_check.py run RUN_DIR --steps 1-30 [--resumed-from 30 --log LOG] [--ema 29,30]
    python benchmarks/gpu_check.py profile RUN_DIR 33
    python benchmarks/gpu_check.py compile-log LOG
    python benchmarks/gpu_check.py junit XML
    python benchmarks/gpu_check.py summary WORK OUT_JSON
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import math
import re
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

# (import name, distribution) the stages need; the GPU machine lacks the DeepSpeed group, lmdb and pytest
REQUIRED = [
    ("torch", "torch"), ("triton", "triton"), ("timm", "timm"), ("numpy", "numpy"), ("PIL", "pillow"),
    ("skimage", "scikit-image"), ("safetensors", "safetensors"), ("yaml", "pyyaml"), ("tqdm", "tqdm"),
    ("deepspeed", "deepspeed"), ("hjson", "hjson"), ("pydantic", "pydantic"), ("msgpack", "msgpack"),
    ("psutil", "psutil"), ("cpuinfo", "py-cpuinfo"), ("einops", "einops"), ("lmdb", "lmdb"), ("pytest", "pytest"),
    ("pytest_timeout", "pytest-timeout"), ("mcf", "mcf"), ("mcf.kernels", "mcf"),
]
OPTIONAL = [("nvidia.dali", "nvidia-dali-cuda130"), ("mlflow", "mlflow")]
# config keys other work adds (issue 11): recorded from a run's config.yaml where the config has them
WATCHED_KEYS = ("train.target_precision", "train.tf32", "data.num_workers", "data.loader", "deepspeed.reduce_dtype",
                "attention.backend", "masking.ratio_range", "train.compile")
EXPECTED_STAGES = ("install", "pretrain", "resume", "bench_step", "profile", "kernels", "compile", "triton_range",
                   "bench_attention", "loader")


class CheckFailed(Exception):
    """The stage ran but its claim does not hold (one line: what and where)."""


# -- imports ---------------------------------------------------------------------------------------
def check_imports(repo: Path) -> dict[str, Any]:
    """Version of every module the stages need; ``missing`` lists those that do not import."""
    from importlib import metadata

    out: dict[str, Any] = {"modules": {}, "missing": [], "optional_missing": []}
    for group, names in (("required", REQUIRED), ("optional", OPTIONAL)):
        for module, dist in names:
            try:
                mod = importlib.import_module(module)
            except Exception as e:  # noqa: BLE001 - any import failure is reported
                out["modules"][module] = f"MISSING ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                out["missing" if group == "required" else "optional_missing"].append(module)
                continue
            try:
                version = metadata.version(dist)
            except metadata.PackageNotFoundError:
                version = getattr(mod, "__version__", "?")
            out["modules"][module] = f"{version} ({Path(getattr(mod, '__file__', '') or '?').parent})"
    if "mcf.kernels" not in out["missing"]:
        import mcf.kernels

        where = Path(mcf.kernels.__file__).resolve().parent
        if where != (repo / "kernels").resolve():
            out["missing"].append("mcf.kernels")
            out["modules"]["mcf.kernels"] = (f"imports from {where}, not this tree's kernels/ "
                                             "(reinstall: pip install --no-deps -e .)")
    import torch

    out["torch"] = {
        "version": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "capability": list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None,
    }
    out["python"] = sys.version.split()[0]
    if out["missing"]:
        raise CheckFailed(f"not importable: {', '.join(out['missing'])}", out)
    return out


# -- a pretrain run folder -------------------------------------------------------------------------
def _metrics(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise CheckFailed(f"{path} missing: the run logged nothing")
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _steps(spec: str) -> list[int]:
    lo, _, hi = spec.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def _watched_keys(run: Path) -> dict[str, Any]:
    import yaml

    path = run / "config.yaml"
    cfg = yaml.safe_load(path.read_text()) if path.is_file() else {}
    found = {}
    for key in WATCHED_KEYS:
        section, _, leaf = key.partition(".")
        if isinstance(cfg.get(section), dict) and leaf in cfg[section]:
            found[key] = cfg[section][leaf]
    return found


def check_ema(run: Path, before: int, after: int) -> dict[str, Any]:
    """target_after == m·target_before + (1 − m)·online_after, every EMA parameter, from the fp32 masters.

    Reads both checkpoints with :func:`mcf.train.checkpoint.load_consolidated` (what ``mcf
    export-fp32`` writes), m from the run's momentum schedule at the update that made ``after``.
    """

    from mcf.config import load_config_dict
    from mcf.models import create_model_from_config
    from mcf.train.checkpoint import load_consolidated
    from mcf.train.optim import momentum_at

    root = run / "checkpoints"
    a, b = (load_consolidated(root / f"step_{s:08d}") for s in (before, after))
    if (a["step"], b["step"]) != (before, after):
        raise CheckFailed(f"checkpoints hold steps {a['step']}, {b['step']}, not {before}, {after}")
    cfg = load_config_dict(b["config"])
    total = cfg.train.max_steps or 0
    m = momentum_at(after - 1, cfg.momentum, total)
    names = [n for n, _ in create_model_from_config(cfg).ema_pairs()]  # parameters; buffers are not averaged
    worst, not_bf16 = 0.0, 0
    for name in names:
        t0, t1, online = (d[name].detach() for d in (a["target"], b["target"], b["online"]))
        expected = t0 * m + online * (1 - m)
        err = float(((t1 - expected).abs() - 1e-6 * expected.abs()).max())
        worst = max(worst, err)
        not_bf16 += int((online != online.bfloat16().float()).any())
        if err > 1e-7:
            raise CheckFailed(f"EMA off its formula at {name}: |target - (m·target_prev + (1-m)·online)| "
                              f"exceeds 1e-6·|x| + 1e-7 by {err:.3g} (m={m})")
    if not_bf16 == 0:
        raise CheckFailed("no online master weight has more than bf16 precision: the EMA did not read fp32 masters")
    return {"ema_steps": [before, after], "momentum": m, "parameters": len(names), "worst_excess": worst,
            "params_with_fp32_detail": not_bf16}


def check_run(run: Path, steps: str, resumed_from: int | None = None, ema: str | None = None,
              log: Path | None = None) -> dict[str, Any]:
    records = [r for r in _metrics(run) if "loss" in r]
    want = _steps(steps)
    got = {r["step"]: r for r in records}
    missing = [s for s in want if s not in got]
    if missing:
        raise CheckFailed(f"steps {missing[:5]}{'…' if len(missing) > 5 else ''} not logged in {run}/metrics.jsonl")
    losses = [got[s]["loss"] for s in want]
    bad = [s for s, v in zip(want, losses) if not math.isfinite(v)]
    if bad:
        raise CheckFailed(f"non-finite loss at steps {bad[:5]}")
    done = run / "checkpoints" / f"step_{want[-1]:08d}" / "COMPLETE"
    if not done.is_file():
        raise CheckFailed(f"no complete final checkpoint {done.parent}")
    speeds = [got[s]["images_per_s"] for s in want[3:]] or [got[s]["images_per_s"] for s in want]
    out: dict[str, Any] = {"steps": [want[0], want[-1]], "loss_first": losses[0], "loss_last": losses[-1],
                           "images_per_s_median": statistics.median(speeds), "config": _watched_keys(run)}
    if resumed_from is not None:
        text = log.read_text(errors="replace") if log and log.is_file() else ""
        if f"(step {resumed_from}," not in text:
            raise CheckFailed(f"the log does not say it resumed from step {resumed_from}")
        out["resumed_from"] = resumed_from
    if ema:
        before, after = (int(x) for x in ema.split(","))
        out["ema"] = check_ema(run, before, after)
    return out


def profile(run: Path, step: int) -> dict[str, Any]:
    """The shares of the mcf.* ranges in the step that ``logging.profile_step`` profiled."""
    path = run / f"profile_step_{step}.json"
    if not path.is_file():
        raise CheckFailed(
            f"{path.name} missing: logging.profile_step={step} wrote no profile (see the resume stage's log)"
        )
    prof = json.loads(path.read_text())
    shares = {}
    for k, v in prof["ranges"].items():
        device = None if v["device_share"] is None else round(v["device_share"], 4)
        shares[k[4:]] = {"host": round(v["host_share"], 4), "device": device, "host_ms": round(v["host_ms"], 3),
                         "device_ms": round(v["device_ms"], 3)}
    return {"step": prof["step"], "device": prof["device"], "wall_ms": prof["wall_ms"], "device_ms": prof["device_ms"],
            "shares": shares, "top_ops": prof["top_ops"][:8]}


# -- logs ------------------------------------------------------------------------------------------
def compile_log(path: Path) -> dict[str, Any]:
    """Counts what ``TORCH_LOGS=recompiles,graph_breaks`` printed (a count, not a failure: the trainer
    compiles the online model inside DeepSpeed's engine, and each break is worth reading)."""
    text = path.read_text(errors="replace") if path.is_file() else ""
    breaks = re.findall(r"^.*Graph break.*$", text, flags=re.MULTILINE)
    recompiles = re.findall(r"^.*Recompiling function.*$", text, flags=re.MULTILINE)
    return {"graph_breaks": len(breaks), "recompiles": len(recompiles), "graph_break_lines": breaks[:10],
            "recompile_lines": recompiles[:10]}


def junit(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckFailed(f"{path} missing: pytest did not finish")
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = failed[:20]
    return counts


# -- summary ---------------------------------------------------------------------------------------
def read_stages(work: Path) -> list[dict[str, Any]]:
    """The stage records the shell runner appended to ``WORK/stages.tsv`` (name, status, rc, seconds,
    limit, note), each with its result JSON (``WORK/NAME.json``) when it wrote one."""
    rows = []
    tsv = work / "stages.tsv"
    for line in (tsv.read_text().splitlines() if tsv.is_file() else []):
        name, status, rc, seconds, limit, note = (line.split("\t") + [""] * 6)[:6]
        row: dict[str, Any] = {"name": name, "status": status, "rc": int(rc or 0), "seconds": float(seconds or 0),
                               "limit_s": int(limit or 0), "note": note}
        result = work / f"{name}.json"
        if result.is_file():
            try:
                row["result"] = json.loads(result.read_text())
            except json.JSONDecodeError:
                row["result"] = None
                row["note"] = (note + "; " if note else "") + "result JSON unreadable"
        if status != "pass":
            logf = work / f"{name}.log"
            row["log_tail"] = logf.read_text(errors="replace").splitlines()[-25:] if logf.is_file() else []
            if row.get("result") is None:
                got = partial(work, name)
                if got:
                    row["partial"] = got
        rows.append(row)
    return rows


# the run folder each training stage writes (resume continues pretrain's)
RUN_DIRS = {"pretrain": "pretrain", "resume": "pretrain", "compile": "compile", "triton_range": "triton_range"}


def partial(work: Path, name: str) -> dict[str, Any]:
    """What a stage that ran out of time (or failed) measured before it stopped: the steps its run logged
    (loss, images/s, complete checkpoints), the kernel tests pytest reported, the loader runs that finished."""
    out: dict[str, Any] = {}
    try:
        if name in RUN_DIRS:
            run = work / RUN_DIRS[name]
            path = run / "metrics.jsonl"
            rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
            rows = [r for r in rows if "loss" in r]
            if rows:
                speeds = [r["images_per_s"] for r in rows[3:]] or [r["images_per_s"] for r in rows]
                out.update(steps_logged=[rows[0]["step"], rows[-1]["step"]], loss_last=rows[-1]["loss"],
                           images_per_s_median=statistics.median(speeds))
            done = sorted(int(p.parent.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*/COMPLETE"))
            if done:
                out["complete_checkpoints"] = done
            if name in ("compile", "triton_range"):
                counts = compile_log(work / f"{name}.log")
                out.update(graph_breaks=counts["graph_breaks"], recompiles=counts["recompiles"])
        elif name == "kernels":  # pytest -q progress lines: one character per test
            text = (work / "kernels.log").read_text(errors="replace") if (work / "kernels.log").is_file() else ""
            marks = "".join(m.group(1) for m in re.finditer(r"^([.FEsx]+)(?: +\[ *\d+%\])?$", text, flags=re.MULTILINE))
            if marks:
                out.update(
                    passed=marks.count("."), failed=marks.count("F") + marks.count("E"), skipped=marks.count("s")
                )
        elif name == "loader":
            files = sorted(work.glob("loader_w*.json"))
            if files:
                out.update(loader_summary(files))
    except (OSError, ValueError, KeyError, CheckFailed):
        pass
    return out


def _headline(row: dict[str, Any]) -> str:
    r = row.get("result") or {}
    name = row["name"]
    try:
        if name == "install":
            return f"torch {r['torch']['version']} on {r['torch']['device'] or 'CPU'}"
        if name == "kernels":
            return f"{r['passed']} passed, {r['failures'] + r['errors']} failed, {r['skipped']} skipped"
        if name in ("pretrain", "resume", "compile", "triton_range"):
            s = (f"steps {r['steps'][0]}-{r['steps'][1]}, loss {r['loss_first']:.4g} → {r['loss_last']:.4g}, "
                 f"{r['images_per_s_median']:.0f} img/s")
            if "ema" in r:
                s += f", EMA = formula ({r['ema']['parameters']} params, m={r['ema']['momentum']})"
            if "graph_breaks" in r:
                s += f", {r['graph_breaks']} graph breaks, {r['recompiles']} recompiles"
            return s
        if name == "profile":
            sh = r["shares"]
            key = "device" if r.get("device_ms") else "host"
            return f"{key} shares: " + ", ".join(
                f"{k} {v[key] * 100:.0f}%" for k, v in sh.items() if v[key] is not None
            )
        if name == "bench_step":
            return ", ".join(f"{v} {r[v]['images_per_s']:.0f} img/s (MFU {r[v]['mfu'] * 100:.1f}%)"
                             for v in ("paper", "mcf") if r.get(v))
        if name == "bench_attention":
            return f"{len(r.get('results', []))} rows, Triton faster at {len(r.get('triton_faster', []))} shapes"
        if name == "loader":
            return ", ".join(f"{w} workers {ips:.0f} img/s" for w, ips in r["torch_images_per_s"].items())
    except (KeyError, TypeError, IndexError, ValueError):
        pass
    if row.get("partial"):
        return "partial: " + ", ".join(f"{k} {v}" for k, v in row["partial"].items() if not isinstance(v, dict))
    return ""


def summary(work: Path, out_json: Path, meta: dict[str, Any] | None = None) -> int:
    """Writes every stage into ``out_json``, prints the table; returns the number of stages not passed."""
    rows = read_stages(work)
    meta = dict(meta or {})
    for line in (work / "meta.txt").read_text().splitlines() if (work / "meta.txt").is_file() else []:
        key, _, value = line.partition("=")
        meta[key] = value
    bad = [r for r in rows if r["status"] != "pass"]
    missing = [s for s in meta.get("stages", " ".join(EXPECTED_STAGES)).split() if s not in {r["name"] for r in rows}]
    doc = {"meta": meta, "stages": rows, "not_run": missing, "failed": len(bad) + len(missing)}
    out_json.write_text(json.dumps(doc, indent=1) + "\n")
    print("\n=== gpu_check summary ===")
    for key in ("date", "commit", "device", "host", "total_s"):
        if key in meta:
            print(f"{key}: {meta[key]}")
    for r in rows:
        print(f"{r['name']:16s} {r['status']:8s} {r['seconds']:6.1f}s /{r['limit_s']:4d}s  {_headline(r) or r['note']}")
    for name in missing:
        print(f"{name:16s} not run")
    for r in rows:
        rows_text = (r.get("result") or {}).get("suggested_rows")
        if r["name"] == "bench_attention" and rows_text:
            print(rows_text)
    print(f"{len(bad) + len(missing)} stage(s) not passed; JSON: {out_json}")
    return len(bad) + len(missing)


# -- entry -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("imports")
    s.add_argument("repo", type=Path)
    s = sub.add_parser("run")
    s.add_argument("run_dir", type=Path)
    s.add_argument("--steps", required=True, help="A-B: the steps this run must have logged")
    s.add_argument("--resumed-from", type=int)
    s.add_argument("--ema", help="K,K+1: check the EMA between these two checkpoints")
    s.add_argument("--log", type=Path, help="the run's log (for --resumed-from)")
    s.add_argument("--compile-log", action="store_true", help="also count graph breaks / recompiles in --log")
    s = sub.add_parser("profile")
    s.add_argument("run_dir", type=Path)
    s.add_argument("step", type=int)
    s = sub.add_parser("compile-log")
    s.add_argument("log", type=Path)
    s = sub.add_parser("junit")
    s.add_argument("xml", type=Path)
    s = sub.add_parser("loader")
    s.add_argument("jsons", type=Path, nargs="+")
    s = sub.add_parser("summary")
    s.add_argument("work", type=Path)
    s.add_argument("out", type=Path)
    s.add_argument("--quiet", action="store_true", help="only write the JSON (after each stage)")
    args = p.parse_args(argv)
    if args.cmd == "summary":
        if args.quiet:
            with contextlib.redirect_stdout(io.StringIO()):
                return min(summary(args.work, args.out), 100)
        return min(summary(args.work, args.out), 100)
    stdout, sys.stdout = sys.stdout, sys.stderr  # libraries print (DeepSpeed's checkpoint reader): stdout is the JSON's
    try:
        if args.cmd == "imports":
            result = check_imports(args.repo.resolve())
        elif args.cmd == "run":
            result = check_run(args.run_dir, args.steps, args.resumed_from, args.ema, args.log)
            if args.compile_log:
                result.update(compile_log(args.log))
        elif args.cmd == "profile":
            result = profile(args.run_dir, args.step)
        elif args.cmd == "compile-log":
            result = compile_log(args.log)
        elif args.cmd == "junit":
            result = junit(args.xml)
            if result["failures"] or result["errors"] or not result["tests"]:
                raise CheckFailed(
                    f"{result['failures'] + result['errors']} of {result['tests']} kernel tests failed", result
                )
        else:  # loader
            result = loader_summary(args.jsons)
    except CheckFailed as e:
        print(json.dumps({"error": e.args[0], **(e.args[1] if len(e.args) > 1 else {})}, indent=1), file=stdout)
        print(f"check failed: {e.args[0]}", file=sys.stderr)
        return 1
    finally:
        sys.stdout = stdout
    print(json.dumps(result, indent=1))
    return 0


def loader_summary(paths: list[Path]) -> dict[str, Any]:
    """``mcf bench data`` runs at several worker counts → images/s of mcf's torch loader and the release's
    PIL loader."""
    torch_ips, paper_ips, runs = {}, {}, []
    for path in paths:
        d = json.loads(path.read_text())
        runs.append(d)
        for row in d["results"]:
            if "images_per_s" not in row:
                continue
            target = torch_ips if row["loader"] == "torch" else paper_ips if row["loader"] == "paper-pil" else None
            if target is not None:
                target[str(row["workers"])] = row["images_per_s"]
    if not torch_ips:
        raise CheckFailed("no torch-loader row with images/s in " + ", ".join(map(str, paths)))
    return {
        "torch_images_per_s": torch_ips, "paper_pil_images_per_s": paper_ips,
        "dali_available": runs[0].get("dali_available"), "device": runs[0].get("device"), "files": runs[0].get("files"),
        "img_size": runs[0]["config"]["img_size"], "batch_size": runs[0]["config"]["batch_size"],
    }


if __name__ == "__main__":
    sys.exit(main())
