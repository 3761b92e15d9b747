"""Per-sample random masking by argsort of uniform noise (MAE), with an optional per-sample ratio."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def random_masking(noise: torch.Tensor, ratio: float, ratios: torch.Tensor | None = None) -> Masking:
    """Masks from noise ``[N, L]``: patches sorted by noise ascending, the first ``keep`` kept.

    ``ratios`` (``[N]``) gives each sample its own ratio; the visible sets are then padded to the
    largest and ``keep_lens`` says how many of each are real.
    """
    N, L = noise.shape
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    if ratios is None:
        keep = num_keep(L, ratio)
        mask = torch.ones(N, L, device=noise.device)
        mask[:, :keep] = 0
        return Masking(ids_shuffle, ids_restore, torch.gather(mask, 1, ids_restore), keep)
    # + 1e-4: float32 ratios (0.6 → 0.60000002) must floor like the Python int() of the fixed path
    keep_lens = (L * (1 - ratios.double()) + 1e-4).floor().long().clamp_(min=1, max=L)  # (N,)
    keep = int(keep_lens.max())
    mask = (ids_restore >= keep_lens[:, None]).float()  # rank in the shuffle >= keep_len → removed
    return Masking(ids_shuffle, ids_restore, mask, keep, keep_lens)
