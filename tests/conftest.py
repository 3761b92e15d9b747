import os

# The Triton kernels run on the CPU through the interpreter; triton reads this when @triton.jit
# runs, so it must be set before any kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu") if not os.environ.get("MCF_TEST_GPU") else None
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".torch_extensions"))

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
