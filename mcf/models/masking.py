"""Per-sample random masking by argsort of uniform noise (MAE), with an optional per-sample ratio."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# float32 ratios (0.6 → 0.60000002) must floor like the Python int() of the fixed path
_RATIO_EPS = 1e-4


@dataclass
class Masking:
    """Which patches each sample keeps.

    ids_shuffle / ids_restore: ``[N, L]`` int64, a permutation and its inverse; ``mask``: ``[N, L]``
    float, 1 = removed; ``keep``: visible tokens gathered (the padded count when ratios vary);
    ``keep_lens``: ``[N]`` int64 visible tokens per sample, or None when every sample keeps ``keep``.
    """

    ids_shuffle: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor
    keep: int
    keep_lens: torch.Tensor | None = None


def num_keep(num_patches: int, ratio: float) -> int:
    return int(num_patches * (1 - ratio))


def max_keep(num_patches: int, min_ratio: float) -> int:
    """The most patches a sample whose ratio is ``>= min_ratio`` keeps (the padded length), on the host."""
    return min(num_patches, max(1, math.floor(num_patches * (1 - min_ratio) + _RATIO_EPS)))


def random_masking(
    noise: torch.Tensor, ratio: float, ratios: torch.Tensor | None = None, min_ratio: float | None = None
) -> Masking:
    """Masks from noise ``[N, L]``: patches sorted by noise ascending, the first ``keep`` kept.

    ``ratios`` (``[N]``, on the noise's device) gives each sample its own ratio (``ratio`` is then
    unused). The visible sets are padded to ``max_keep(L, min_ratio)`` — the lowest ratio the
    samples can have, e.g. ``masking.ratio_range``'s lower bound; None = 0, every patch — which is
    known on the host, so no shape waits for the device (no host sync, no ``torch.compile`` graph
    break); ``keep_lens`` says how many of each are real. A ratio below ``min_ratio`` keeps only
    ``max_keep(L, min_ratio)`` patches.
    """
    N, L = noise.shape
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    if ratios is None:
        keep = num_keep(L, ratio)
        mask = torch.ones(N, L, device=noise.device)
        mask[:, :keep] = 0
        return Masking(ids_shuffle, ids_restore, torch.gather(mask, 1, ids_restore), keep)
    keep = max_keep(L, 0.0 if min_ratio is None else min_ratio)
    keep_lens = (L * (1 - ratios.double()) + _RATIO_EPS).floor().long().clamp(min=1, max=keep)  # (N,)
    mask = (ids_restore >= keep_lens[:, None]).float()  # rank in the shuffle >= keep_len → removed
    return Masking(ids_shuffle, ids_restore, mask, keep, keep_lens)
