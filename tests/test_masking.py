import torch

from mcf.models.masking import num_keep, random_masking


def test_fixed_ratio_removes_exactly_L_minus_keep():
    noise = torch.rand(16, 196)
    m = random_masking(noise, 0.75)
    keep = num_keep(196, 0.75)
    assert keep == 49 and m.keep == 49
    assert torch.all(m.mask.sum(1) == 196 - keep)
    # ids_restore inverts ids_shuffle, and the kept patches are the smallest-noise ones
    ar = torch.arange(196).expand(16, -1)
    assert torch.equal(torch.gather(m.ids_shuffle, 1, m.ids_restore), ar)
    kept = torch.zeros(16, 196).scatter_(1, m.ids_shuffle[:, :keep], 1.0)
    assert torch.equal(kept, 1 - m.mask)
    thresh = noise.sort(1).values[:, keep - 1 : keep]
    assert torch.equal((noise <= thresh).float(), 1 - m.mask)


def test_removed_positions_are_uniform():
    g = torch.Generator().manual_seed(0)
    n, L = 4000, 64
    m = random_masking(torch.rand(n, L, generator=g), 0.75)
    freq = m.mask.mean(0)  # each position removed with probability 48/64
    # binomial std of a frequency over 4000 draws is ~0.0068: 5 sigma bound
    assert torch.all((freq - 0.75).abs() < 0.035), freq


def test_per_sample_ratios_pad_and_count():
    g = torch.Generator().manual_seed(0)
    ratios = torch.tensor([0.6, 0.9, 0.75, 0.0])
    m = random_masking(torch.rand(4, 100, generator=g), 0.75, ratios)
    assert m.keep_lens.tolist() == [40, 10, 25, 100]
    assert m.keep == 100
    assert m.mask.sum(1).tolist() == [60.0, 90.0, 75.0, 0.0]
