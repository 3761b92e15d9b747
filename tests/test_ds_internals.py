"""The version check beside mcf's reads of DeepSpeed's private state (mcf.train.ds_internals)."""

from __future__ import annotations

import importlib.metadata

import pytest

from mcf.errors import ConfigError
from mcf.train import ds_internals


def test_the_pinned_release_passes_any_other_is_one_line():
    ds_internals.check_deepspeed_version("0.19.8")
    ds_internals.check_deepspeed_version("0.19.8+cu124")  # a local build of the same release
    for other in ("0.19.9", "0.20.0", "0.19.80", "0.19"):
        with pytest.raises(ConfigError, match=rf"^mcf reads DeepSpeed 0\.19\.8's .*DeepSpeed {other} is installed: "
                                              r"pip install deepspeed==0\.19\.8$"):
            ds_internals.check_deepspeed_version(other)


def test_the_installed_release_is_checked_before_any_probe(monkeypatch):
    """The probes refuse to read an unknown DeepSpeed: the layout is not built, nothing is read."""
    ds_internals.installed_deepspeed_version.cache_clear()
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.20.1")
    try:
        with pytest.raises(ConfigError, match="DeepSpeed 0.20.1 is installed"):
            ds_internals.build_layout(object(), {}, {}, 1, 0)
        with pytest.raises(ConfigError, match="DeepSpeed 0.20.1 is installed"):
            ds_internals.fp32_masters(object(), [], "bf16", 3)
        with pytest.raises(ConfigError, match="DeepSpeed 0.20.1 is installed"):
            ds_internals.repair_universal_load(object(), [])
    finally:
        monkeypatch.undo()
        ds_internals.installed_deepspeed_version.cache_clear()
    assert ds_internals.installed_deepspeed_version() == ds_internals.DEEPSPEED_VERSION  # this venv's pin
