import os

# The Triton kernels run on the CPU through the interpreter; triton reads this when @triton.jit
# runs, so it must be set before any kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu") if not os.environ.get("MCF_TEST_GPU") else None
# mcf's per-user cache (the built-in demo set, `mcf bench`'s default MLflow store) in a folder of this
# test session, never the user's ~/.cache/mcf
if not os.environ.get("MCF_CACHE"):
    import atexit
    import shutil
    import tempfile

    os.environ["MCF_CACHE"] = tempfile.mkdtemp(prefix="mcf-test-cache-")
    atexit.register(shutil.rmtree, os.environ["MCF_CACHE"], True)
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".torch_extensions")
)

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def poison_kernel_outputs(monkeypatch):
    """Kernel outputs start as NaN (floats) or -1 (integers), never as lucky zeros."""
    from mcf.kernels import _triton_utils as tu

    def empty(shape, dtype, device):
        return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)

    monkeypatch.setattr(tu, "empty", empty)


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow tracking server on 127.0.0.1 (sqlite store ``tmp_path/server.db``): (url, healthy(), process)."""
    import signal
    import subprocess
    import urllib.request

    from train_helpers import BIN, env, free_port, kill_tree

    port = free_port()
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--default-artifact-root", str(tmp_path / "art"),
        ],
        env=env(),
        stdout=open(tmp_path / "server.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return urllib.request.urlopen(url + "/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        yield url, healthy, proc
    finally:
        kill_tree(proc, signal.SIGTERM)
