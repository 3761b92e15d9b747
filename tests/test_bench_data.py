"""``mcf bench data`` at a tiny size: every loader row measured (or skipped/errored with a reason); the
index-scale mode at a tiny size."""

from __future__ import annotations

import json
import subprocess
import sys

from mcf.cli import main


def test_data_json(tmp_path):
    out = tmp_path / "data.json"
    argv = [
        "bench", "data", "--count", "24", "--file-size", "48", "--img-size", "32", "--batch-size", "4", "--batches",
        "2", "--workers", "0", "--out", str(out),
    ]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    for key in ("results", "ratio", "dali_available", "device", "files", "date", "commit"):
        assert key in result, key
    assert result["files"] == 24
    rows = {(r["source"], r["loader"]): r for r in result["results"]}
    assert set(rows) == {
        ("folder", "torch"), ("folder", "dali"), ("lmdb", "torch"), ("lmdb", "dali"), ("shards", "torch"),
        ("shards", "dali"), ("folder", "paper-pil"),
    }
    for key, row in rows.items():
        if "images_per_s" in row:
            assert row["images_per_s"] > 0 and row["batch_shape"] == [4, 3, 32, 32], key
        else:
            assert row.get("skipped") or row.get("error"), key
    assert "images_per_s" in rows[("folder", "torch")] and "images_per_s" in rows[("folder", "paper-pil")]
    assert "images_per_s" in rows[("shards", "torch")]
    if result["dali_available"]:
        assert "images_per_s" in rows[("folder", "dali")]
        assert result["ratio"]["folder_dali_over_torch"] > 0


def test_index_scale_json(tmp_path):
    """In its own process, as a user runs it: the copy-on-write growth of a forked worker depends on the parent's heap.
    Inside the long-lived pytest process the key strings land in half-used pools beside objects that the worker's
    ``gc.collect()`` writes to, so a third of their pages are private before the measurement starts (CI measured 21
    bytes/key for ``list[str]`` there, 62 in a fresh process)."""
    out = tmp_path / "index.json"
    argv = [
        "bench", "data", "--index-scale", "20000", "--folder-files", "2000", "--worker-keys", "20000",
        "--out", str(out), "--tracking-uri", "none",
    ]
    p = subprocess.run([sys.executable, "-m", "mcf", *argv], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    r = json.loads(out.read_text())
    keys = r["keys"]
    assert keys["samples"] == 20000 and keys["index_bytes_per_sample"] < 18  # 13-character keys + a uint32 offset
    assert keys["reopen"]["open_s"] < keys["first_open"]["open_s"] + 1
    assert keys["worker_list_of_str"]["private_dirty_growth_per_key"] > 10 * max(
        keys["worker_compact"]["private_dirty_growth_per_key"], 1
    )
    assert r["folder"]["files"] == 2000 and r["folder"]["index_bytes_per_sample"] < 24
    assert r["shards"]["index_bytes_per_sample"] < 9 and r["shards"]["sampler_batch_of_256_s"] > 0
