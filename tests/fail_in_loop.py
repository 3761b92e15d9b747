"""Runs ``mcf <args>`` with the model's forward raising a RuntimeError on its second call (an
unexpected failure inside the training loop, not one the trainer handles). For tests/test_train_failure_exit.py."""

from __future__ import annotations

import sys

import mcf.models.mcf as mcf_model

_forward = mcf_model.MCF.forward
_calls = [0]


def _failing_forward(self, *args, **kwargs):
    _calls[0] += 1
    if _calls[0] == 2:
        raise RuntimeError("injected failure in the training loop")
    return _forward(self, *args, **kwargs)


mcf_model.MCF.forward = _failing_forward

from mcf.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
