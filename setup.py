import warnings
from pathlib import Path

from setuptools import setup

# kernels/ and ds_configs/ are installed as mcf.kernels / mcf.ds_configs (package_dir below), so an
# editable install needs setuptools' import finder rather than a plain path entry, and setuptools
# announces that finder on every `pip install -e .` with a generic note about same-named folders in
# the working directory. It says nothing about this project; keep the install quiet.
warnings.filterwarnings("ignore", message="Editable installation", module="setuptools")

ROOT = Path(__file__).parent
# Every folder of the package, data-only ones included (mcf.presets: YAML, mcf.ds_configs: JSON),
# so setuptools neither drops nor warns about them; tests/test_packaging.py checks the list.
PACKAGES = [
    "mcf",
    "mcf.models",
    "mcf.losses",
    "mcf.train",
    "mcf.data",
    "mcf.data.core",
    "mcf.data.formats",
    "mcf.data.loaders",
    "mcf.data.tools",
    "mcf.downstream",
    "mcf.bench",
    "mcf.presets",
    "mcf.kernels",
    "mcf.ds_configs",
]

setup(
    name="mcf",
    version="0.1.0",
    description="Mask Contrastive Face: self-supervised facial representation learning at scale",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"mcf.kernels": "kernels", "mcf.ds_configs": "ds_configs"},
    package_data={"mcf.presets": ["*.yaml"], "mcf.ds_configs": ["*.json"], "mcf.kernels": ["*.json"]},
    install_requires=[
        "torch>=2.4",
        "timm>=1.0",
        "deepspeed==0.19.8",  # ZeRO 0-3 losses verified equal by tests/test_train_*; upstream #7718
        "numpy",
        "pillow",
        "lmdb",
        "mlflow>=2.10",
        "psutil",  # MLflow's system metrics (CPU, memory) of every run
        "safetensors",
        "pyyaml",
        "tqdm",
        "scikit-image>=0.22",
        "scipy",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130"],
        "triton": ["triton>=3.2"],
        "test": ["pytest", "pytest-timeout", "ruff==0.17.6"],  # ruff pinned: tests/test_lint.py runs it
    },
    entry_points={"console_scripts": ["mcf=mcf.cli:main"]},
)
