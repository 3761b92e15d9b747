"""setup.py's explicit package list names every folder that ships: a sub-package missing from it is
left out of a wheel (its modules then fail to import only after installation, never in this tree)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# setup.py's package_dir: these folders beside mcf/ install as sub-packages of mcf
PACKAGE_DIR = {"mcf.kernels": ROOT / "kernels", "mcf.ds_configs": ROOT / "ds_configs"}


def setup_packages() -> list[str]:
    """The ``PACKAGES`` list of setup.py, read without running setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PACKAGES" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no PACKAGES list")


def shipped_folders() -> set[str]:
    """Every folder of the package that holds a module or a data file, as a dotted package name."""
    out = set(PACKAGE_DIR)
    for path in (ROOT / "mcf").rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".yaml", ".json"):
            out.add(".".join(path.parent.relative_to(ROOT).parts))
    return out


def test_setup_lists_every_package_folder():
    listed = setup_packages()
    assert len(listed) == len(set(listed)), "a package listed twice"
    assert set(listed) == shipped_folders()
    assert {"mcf.data.core", "mcf.data.formats", "mcf.data.loaders", "mcf.data.tools"} <= set(listed)
