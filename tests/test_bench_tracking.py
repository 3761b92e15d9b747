"""``mcf bench`` runs in MLflow: a tiny ``bench step`` lands as a run with its metrics, params and JSON
in the store it was given (or ``MLFLOW_TRACKING_URI``'s); ``bench history`` prints and plots two
commits' runs; ``bench results --write`` regenerates RESULTS.md's tracked section from the store."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from mcf.bench import tracking
from mcf.cli import main

TINY = ["--model", "mcf_vit_tiny", "--img-size", "32", "--batch-size", "2", "--repeats", "1", "--warmup", "1",
        "--variants", "paper,mcf"]


def _runs(uri: str, experiment: str = "mcf-bench"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment} in {uri}"
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_bench_step_is_an_mlflow_run_with_every_figure(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    uri = f"sqlite:///{tmp_path}/store.db"
    out = tmp_path / "step.json"
    assert main(["bench", "step", *TINY, "--out", str(out), "--tracking-uri", uri]) == 0
    result = json.loads(out.read_text())
    client, runs = _runs(uri)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    m, p, t = run.data.metrics, run.data.params, run.data.tags
    # every figure printed is a metric, under its JSON path
    for variant in ("paper", "mcf"):
        for key in ("images_per_s", "ms_per_step", "mfu", "flops_per_image", "peak_memory_bytes"):
            assert m[f"{variant}.{key}"] == pytest.approx(result[variant][key], rel=1e-12)
    assert m["ratio"] == pytest.approx(result["ratio"], rel=1e-12)
    assert m["peak_flops.bf16"] == pytest.approx(result["peak_flops"]["bf16"], rel=1e-12)
    assert not any(k.startswith(("config.", "date", "commit")) for k in m)  # descriptions are not figures
    # what was measured, where, with what
    assert p["flag.model"] == "mcf_vit_tiny" and p["flag.batch_size"] == "2" and p["flag.img_size"] == "32"
    assert p["torch"].startswith("2.") and p["deepspeed"] and p["host.cpu"] and p["host.cpu_features"]
    assert p["commit"] == t["commit"] == result["commit"].removesuffix("+dirty")
    assert p["dirty"] in ("true", "false") and t["benchmark"] == "step" and t["config_id"]
    # the JSON as an artifact, identical to what was printed
    local = client.download_artifacts(run.info.run_id, "step.json", str(tmp_path / "dl"))
    assert json.loads(Path(local).read_text()) == result


def test_tracking_rules_and_none(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env.db")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team-bench")
    t = tracking.resolve(None)
    assert (t.uri, t.experiment) == (f"sqlite:///{tmp_path}/env.db", "team-bench")
    assert "$MLFLOW_TRACKING_URI" in t.rule and "$MLFLOW_EXPERIMENT_NAME" in t.rule
    assert tracking.resolve("http://x:5000").uri == "http://x:5000"
    assert tracking.resolve("none").uri is None
    assert tracking.resolve(None, "x").experiment == "x"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    monkeypatch.setenv("MCF_CACHE", str(tmp_path / "cache"))
    t = tracking.resolve(None)
    assert (t.uri, t.experiment) == (f"sqlite:///{tmp_path}/cache/bench/mlflow.db", "mcf-bench")
    # `none` logs nothing anywhere (the default store is never created)
    result = {"benchmark": "step", "mcf": {"images_per_s": 1.0}}
    assert tracking.log_bench_run(result, {"model": "m"}, tracking_uri="none") is None
    assert not (tmp_path / "cache").exists()


def test_env_tracking_uri_is_honoured_and_an_unreachable_server_fails_first(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env.db")
    result = {"benchmark": "data", "results": [{"source": "folder", "loader": "torch", "images_per_s": 5.0},
                                               {"source": "folder", "loader": "dali", "images_per_s": 9.0}],
              "ratio": {"folder_dali_over_torch": 1.8}, "commit": "abc+dirty"}
    run_id = tracking.log_bench_run(result, {"batch_size": 4})
    _, runs = _runs(f"sqlite:///{tmp_path}/env.db")
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].data.metrics == {"results.folder-torch.images_per_s": 5.0, "results.folder-dali.images_per_s": 9.0,
                                    "ratio.folder_dali_over_torch": 1.8}
    assert runs[0].data.tags["dirty"] == "true" and runs[0].data.tags["commit"] == "abc"
    # a server that does not answer: one line, exit 2, before any benchmark runs (no JSON printed)
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    rc = main(["bench", "step", *TINY, "--tracking-uri", f"http://127.0.0.1:{port}"])
    out, err = capsys.readouterr()
    assert rc == 2 and "unreachable" in err and "--tracking-uri none" in err and out == ""


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_history_prints_and_plots_two_commits(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    uri = f"sqlite:///{tmp_path}/h.db"
    flags = {"model": "mcf_vit_small_patch16", "img_size": 112, "batch_size": 32}
    figures = {"c0ffee000001": (9.1, 18.7), "c0ffee000002": (9.0, 37.5)}
    for commit, (paper, mcf) in figures.items():
        result = {"benchmark": "step", "commit": commit, "paper": {"images_per_s": paper, "mfu": 0.1},
                  "mcf": {"images_per_s": mcf, "mfu": 0.25}, "ratio": mcf / paper}
        tracking.log_bench_run(result, flags, tracking_uri=uri)
    # another configuration, tracked later: the history of the first is still reachable by --config
    tracking.log_bench_run({"benchmark": "step", "commit": "c0ffee000002", "mcf": {"images_per_s": 1.0}},
                           {**flags, "batch_size": 4}, tracking_uri=uri)
    png = tmp_path / "plot" / "history.png"
    cid = tracking.config_id("step", flags)
    assert main(["bench", "history", "step", "--tracking-uri", uri, "--config", cid[:6], "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| c0ffee")]
    assert len(rows) == 4  # 2 commits × 2 variants, oldest commit first
    assert rows[0].startswith("| c0ffee000001") and rows[-1].startswith("| c0ffee000002")
    assert any("| mcf | 37.5 | 25.0 %" in r for r in rows) and any("| paper | 9.1 | 10.0 %" in r for r in rows)
    assert "other configuration" in out  # the batch-4 runs are named, not mixed in
    w, h = _png_size(png)
    assert w > 300 and h > 200
    # no --config: the newest run's configuration (batch 4), a single point
    assert main(["bench", "history", "--tracking-uri", uri]) == 0
    assert "batch 4" in capsys.readouterr().out
    # an unknown configuration: one line naming the known ones
    assert main(["bench", "history", "--tracking-uri", uri, "--config", "zzz"]) == 2
    assert cid in capsys.readouterr().err


def test_results_section_is_regenerated_from_the_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/r.db"
    tracking.log_bench_run({"benchmark": "step", "commit": "aaa111", "mcf": {"images_per_s": 12.5}}, {"batch_size": 8},
                           tracking_uri=uri)
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# Results\n\nhand-written text\n")
    assert main(["bench", "results", "--tracking-uri", uri, "--benchmarks", "step,e2e", "--write", str(doc)]) == 0
    first = doc.read_text()
    assert first.startswith("# Results\n\nhand-written text\n") and "| aaa111 |" in first and "| 12.5 |" in first
    assert "`mcf bench e2e`" in first and "No runs tracked" in first
    # a new run replaces the section, keeps the rest, and a second write of the same store changes nothing
    tracking.log_bench_run({"benchmark": "step", "commit": "bbb222", "mcf": {"images_per_s": 25.0}}, {"batch_size": 8},
                           tracking_uri=uri)
    doc.write_text(first + "\nmore hand-written text\n")
    assert main(["bench", "results", "--tracking-uri", uri, "--benchmarks", "step,e2e", "--write", str(doc)]) == 0
    second = doc.read_text()
    assert second.count(tracking.BEGIN_MARK) == 1 and "| bbb222 |" in second and "| aaa111 |" in second
    assert second.endswith("more hand-written text\n")
    assert main(["bench", "results", "--tracking-uri", uri, "--benchmarks", "step,e2e", "--write", str(doc)]) == 0
    assert doc.read_text() == second
