"""The pre-training monitor: is the representation improving?

``build_monitor(cfg, device)`` returns a :class:`RepresentationMonitor`; the trainer calls
``evaluate(model)`` on rank 0 every ``cfg.monitor.every`` steps (in eval mode, under no_grad, full
parameters gathered under ZeRO-3) and logs the dict (MLflow, metrics.jsonl) as ``monitor/<key>``:

* ``face_knn_acc``, ``face_linear_acc`` — face / non-face probes on held-out ``lfw_subset`` crops
  (:func:`mcf.downstream.probe.face_probe`: no test face was in the built-in training split);
* ``recon_mse`` — the online model's pixel MSE on the removed patches of held-out images
  (``cfg.monitor.data``: ``builtin`` = the built-in validation faces; else the first 64 images of
  that dataset), in the normalised input space, with fixed masks (seeded noise) so successive
  values are comparable.

Everything is prepared once in ``build_monitor`` (about 0.1 s); an evaluation of the tiny model is
a few forward passes over 220 images.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

MAX_RECON_IMAGES = 64


def _heldout_images(spec: str, size: int) -> torch.Tensor:
    """``[M, 3, size, size]`` normalised held-out images for the reconstruction error."""
    from mcf.downstream.probe import to_model_input

    if spec == "builtin":
        from mcf.data import load_builtin_faces

        images = load_builtin_faces("val")
    else:
        from mcf.data import open_dataset

        ds = open_dataset(spec)
        images = [ds[i] for i in range(min(len(ds), MAX_RECON_IMAGES))]
    arr = np.stack(
        [
            np.asarray(im.convert("RGB").resize((size, size)), dtype=np.float32) / 255.0
            for im in images[:MAX_RECON_IMAGES]
        ]
    )
    return to_model_input(arr, size)


class RepresentationMonitor:
    """Held-out probes of an :class:`mcf.models.MCF` (see module docstring)."""

    def __init__(
        self, recon_images: torch.Tensor, probe_data: tuple[torch.Tensor, torch.Tensor],
        device: torch.device | str = "cpu", seed: int = 0,
    ):
        self.recon_images, self.probe_data, self.device = recon_images, probe_data, torch.device(device)
        self.seed = seed

    @torch.no_grad()
    def reconstruction_error(self, model: Any) -> float:
        from mcf.losses.pixel import pixel_loss

        online = model.online
        p = next(online.parameters())
        x = self.recon_images.to(device=p.device, dtype=p.dtype)
        L = online.encoder.num_patches
        noise = torch.rand(len(x), L, generator=torch.Generator().manual_seed(self.seed)).to(p.device)  # fixed masks
        out = online(x, model.objective.mask_ratio, noise)
        return float(pixel_loss(x.float(), out.pred.float(), out.mask, online.spec.patch_size))

    @torch.no_grad()
    def evaluate(self, model: Any) -> dict[str, float]:
        """``{'face_knn_acc', 'face_linear_acc', 'recon_mse'}`` for ``model`` (an MCF)."""
        from mcf.downstream.probe import face_probe

        was_training = model.online.training
        model.online.eval()
        try:
            metrics = face_probe(model.online.encoder, model.spec.img_size, self.probe_data)
            metrics["recon_mse"] = self.reconstruction_error(model)
        finally:
            model.online.train(was_training)
        return metrics


def build_monitor(cfg: Any, device: torch.device | str = "cpu") -> RepresentationMonitor:
    """The monitor of a run config (``cfg.model``, ``cfg.monitor.data``)."""
    from mcf.downstream.probe import lfw_probe_data
    from mcf.models.registry import get_spec

    size = cfg.model.img_size or get_spec(cfg.model.name).img_size
    return RepresentationMonitor(
        _heldout_images(cfg.monitor.data, size), lfw_probe_data(size), device, seed=cfg.train.seed
    )
