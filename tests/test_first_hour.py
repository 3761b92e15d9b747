"""What a new user meets first: a run folder that is complete on its own (MLflow's pictures inside
it, whatever the working directory), files readable by the group on a shared cluster (the umask
decides every mode), commands free of third-party start-up noise, and a quiet install."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
import venv
import zipfile
from pathlib import Path

import pytest
from train_helpers import BIN, ROOT, env, free_port, kill_tree, wait_for

UMASK = 0o002  # group-writable, as on many shared clusters; 0o022 would hide a file written 0o644 regardless
NOISE = (
    "Setting accelerator", "Setting ds_accelerator", "Creating initial MLflow database", "Updating database tables",
    "does not exist. Creating a new experiment",
)


def _mcf(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``mcf ARGS`` under UMASK, without DS_ACCELERATOR (DeepSpeed then detects and announces its accelerator)."""
    e = env()
    e.pop("DS_ACCELERATOR", None)
    return subprocess.run([sys.executable, "-m", "mcf", *args], cwd=cwd, env=e, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=lambda: os.umask(UMASK))


def _ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step demo run with the default MLflow store, started from a directory that is not the
    run folder's parent, then exported both ways."""
    base = tmp_path_factory.mktemp("first_hour")
    cwd, out = base / "somewhere_else", base / "runs" / "demo"
    cwd.mkdir()
    train = _ok(_mcf("pretrain", "--output-dir", str(out), "--max-steps", "4", "--log-every", "2", "--loader", "torch",
                     "--set", "logging.recon_every=2", "--set", "logging.progress=false", "--set", "data.num_workers=0",
                     cwd=cwd))
    export = _ok(_mcf("export", str(out), str(base / "exports" / "encoder.safetensors"), cwd=cwd))
    fp32 = _ok(_mcf("export-fp32", str(out), str(base / "exports" / "all.pt"), cwd=cwd))
    return {"base": base, "cwd": cwd, "out": out, "procs": {"pretrain": train, "export": export, "export-fp32": fp32}}


def test_mlflow_artifacts_live_in_the_run_folder(run):
    import mlflow

    out, cwd = run["out"], run["cwd"]
    assert not (cwd / "mlruns").exists() and not (out.parent / "mlruns").exists()
    client = mlflow.tracking.MlflowClient(f"sqlite:///{out}/mlflow.db")
    [r] = client.search_runs([client.get_experiment_by_name("mcf").experiment_id])
    artifact_dir = Path(urllib.parse.urlparse(r.info.artifact_uri).path)
    assert artifact_dir.is_relative_to(out.resolve()), r.info.artifact_uri
    pngs = {a.path for a in client.list_artifacts(r.info.run_id, "reconstructions")}
    assert pngs == {"reconstructions/step_00000002.png", "reconstructions/step_00000004.png"}
    assert all((artifact_dir / p).is_file() for p in pngs)


def test_mlflow_ui_with_the_readme_command_shows_the_reconstructions(run, tmp_path):
    """`mlflow ui --backend-store-uri sqlite:///runs/demo/mlflow.db`, from the folder holding runs/
    (as the README says), serves the pictures the run logged."""
    readme = (ROOT / "README.md").read_text()
    assert "mlflow ui --backend-store-uri sqlite:///runs/demo/mlflow.db" in readme
    port = free_port()
    ui = subprocess.Popen(
        [
            str(BIN / "mlflow"), "ui", "--backend-store-uri", "sqlite:///runs/demo/mlflow.db", "--host", "127.0.0.1",
            "--port", str(port), "--workers", "1",
        ],
        cwd=run["base"],
        env=env(),
        stdout=open(tmp_path / "ui.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def get(path: str, body: dict | None = None) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.read()

    def up() -> bool:
        try:
            return get("/health") == b"OK"
        except OSError:
            return False

    try:
        wait_for(up, 120, ui, "mlflow ui")
        exps = json.loads(get("/ajax-api/2.0/mlflow/experiments/search?max_results=10"))["experiments"]
        [exp_id] = [e["experiment_id"] for e in exps if e["name"] == "mcf"]
        runs = json.loads(get("/ajax-api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id]}))["runs"]
        run_id = runs[0]["info"]["run_id"]
        listed = json.loads(get(f"/ajax-api/2.0/mlflow/artifacts/list?run_id={run_id}&path=reconstructions"))["files"]
        assert {f["path"] for f in listed} == {"reconstructions/step_00000002.png", "reconstructions/step_00000004.png"}
        png = get(f"/get-artifact?path=reconstructions/step_00000004.png&run_uuid={run_id}")
        assert png.startswith(b"\x89PNG") and png == (run["out"] / "reconstructions" / "step_00000004.png").read_bytes()
    finally:
        kill_tree(ui)


def test_every_file_written_respects_the_umask(run, tmp_path):
    """Runs, checkpoints, MLflow's store and artifacts, both exports and the LMDB tools: every file
    0o666 & ~umask and every folder 0o777 & ~umask (safetensors and py-lmdb pick their own modes)."""
    from data_helpers import make_folder

    make_folder(tmp_path / "imgs", 6)
    _ok(
        _mcf(
            "data", "build-lmdb", str(tmp_path / "imgs"), str(run["base"] / "built.lmdb"), "--no-progress", "--workers",
            "0", cwd=tmp_path,
        )
    )
    _ok(_mcf("data", "builtin", str(run["base"] / "builtin.lmdb"), cwd=tmp_path))
    wrong = []
    for root, dirs, files in os.walk(run["base"]):
        for name in dirs + files:
            p = Path(root) / name
            if p.is_relative_to(run["cwd"]) or p.is_symlink():
                continue
            want = (0o777 if p.is_dir() else 0o666) & ~UMASK
            if p.stat().st_mode & 0o777 != want:
                wrong.append(f"{p.relative_to(run['base'])}: {oct(p.stat().st_mode & 0o777)}")
    assert not wrong, wrong
    assert (run["base"] / "exports" / "encoder.safetensors").is_file() and (
        run["base"] / "built.lmdb" / "data.mdb"
    ).is_file()


def test_no_third_party_start_up_noise(run, tmp_path):
    """DeepSpeed's accelerator banner and MLflow's store creation stay out of every command's output;
    the training run names its device in its own start-up line."""
    procs = dict(run["procs"])
    procs["data info"] = _ok(_mcf("data", "info", "builtin", cwd=tmp_path))
    for name, p in procs.items():
        text = p.stdout + p.stderr
        assert not [n for n in NOISE if n in text], (name, text[-3000:])
    assert "1 rank(s) on cpu" in procs["pretrain"].stderr


def _declared_packages() -> tuple[list[str], dict[str, str], dict[str, list[str]]]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    names: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            names[node.targets[0].id] = node.value
        if isinstance(node, ast.keyword) and node.arg in ("package_dir", "package_data"):
            names[node.arg] = node.value
    return (ast.literal_eval(names["PACKAGES"]), ast.literal_eval(names["package_dir"]),  # type: ignore[arg-type]
            ast.literal_eval(names["package_data"]))  # type: ignore[arg-type]


def test_every_package_folder_and_data_file_is_declared():
    """A folder of the package missing from setup.py's list is dropped from wheels (and makes
    setuptools warn on every install); a data file no package_data glob matches is dropped too."""
    packages, package_dir, package_data = _declared_packages()
    folders = {"mcf." + ".".join(d.relative_to(ROOT / "mcf").parts) if d != ROOT / "mcf" else "mcf": d
               for d in [ROOT / "mcf", *(ROOT / "mcf").rglob("*")] if d.is_dir() and d.name != "__pycache__"}
    folders.update({name: ROOT / path for name, path in package_dir.items()})
    assert set(packages) == set(folders)
    for name, folder in folders.items():
        data = [f for f in folder.iterdir() if f.is_file() and f.suffix not in (".py", ".pyc")]
        undeclared = [f.name for f in data if not any(f.match(g) for g in package_data.get(name, []))]
        assert not undeclared, (name, undeclared)


def test_editable_install_in_a_fresh_environment_is_quiet(tmp_path):
    """`pip install -e .` as a newcomer runs it (a fresh venv, build isolation, PyPI): no warnings."""
    venv.create(tmp_path / "v", with_pip=True, symlinks=True)
    e = dict(
        os.environ, PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1"
    )  # the machine's pip.conf is not ours
    e.pop("PYTHONPATH", None)
    p = subprocess.run(
        [str(tmp_path / "v" / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)],
        cwd=tmp_path,
        env=e,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == "" and p.stderr.strip() == "", p.stdout[-3000:] + p.stderr[-3000:]
    where = subprocess.run(
        [
            str(tmp_path / "v" / "bin" / "python"),
            "-c",
            "import importlib.util as u; print(*(u.find_spec(m).origin for m in ('mcf.config', 'mcf.kernels')))",
        ],
        cwd=tmp_path,
        env=e,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert where.returncode == 0, where.stderr
    assert where.stdout.split() == [str(ROOT / "mcf" / "config.py"), str(ROOT / "kernels" / "__init__.py")]
    # a regular wheel (what `pip install .` and a cluster image get) carries the data files too
    p = subprocess.run(
        [
            str(tmp_path / "v" / "bin" / "python"), "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "w"),
            str(ROOT),
        ],
        cwd=tmp_path,
        env=e,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0 and p.stdout.strip() == "" and p.stderr.strip() == "", p.stdout[-3000:] + p.stderr[-3000:]
    [wheel] = (tmp_path / "w").glob("mcf-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "mcf/presets/demo.yaml", "mcf/presets/base.yaml", "mcf/ds_configs/zero1_bf16.json", "mcf/kernels/__init__.py",
        "mcf/kernels/masked_attention.py", "mcf/train/trainer.py",
    } <= names
