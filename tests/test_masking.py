import torch
from tolerances import assert_close_scaled

from mcf.models.masking import max_keep, num_keep, random_masking


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


def test_padded_length_is_the_range_bound_for_float32_ratios():
    """The host bound never undercounts a float32 ratio at the bound (so the clamp never cuts a real sample)."""
    for L in (49, 64, 196, 256):
        for lo in [i / 100 for i in range(0, 96)] + [0.6, 0.75, 0.9, 1 / 3]:
            device_len = int((L * (1 - torch.tensor([lo], dtype=torch.float32).double()) + 1e-4).floor().clamp(min=1))
            assert device_len == max_keep(L, lo), (L, lo)
    m = random_masking(torch.rand(3, 64), 0.6, torch.tensor([0.5, 0.6, 0.9]), min_ratio=0.6)
    assert m.keep == 25 and m.keep_lens.tolist() == [25, 25, 6]  # below the bound: clamped to it


def test_ratio_range_attends_what_the_batch_maximum_padding_attended():
    """Padding to the range's bound (host) instead of the batch's largest keep (a device read) changes
    only the padding: same masks, same visible tokens' encoding, same prediction and loss terms."""
    from mcf.models import Objective, create_model

    torch.manual_seed(0)
    objective = Objective(mask_ratio_range=(0.5, 0.9))
    model = create_model("mcf_vit_tiny", teacher_checkpoint="random", objective=objective).eval()
    x, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 64)
    ratios = torch.tensor([0.7, 0.85, 0.62, 0.9])
    enc = model.online.encoder
    with torch.no_grad():
        lat, m, key_mask = enc(x, 0.5, noise, ratios)  # padded to max_keep(64, 0.5) = 32
        lat_old, m_old, _ = enc(x, float(ratios.min()), noise, ratios)  # padded to the batch max, as before
        pred = model.online.decoder(lat, m.ids_restore, m.keep_lens)
        pred_old = model.online.decoder(lat_old, m_old.ids_restore, m_old.keep_lens)
    assert m.keep == 32 and m_old.keep == int(m.keep_lens.max()) == 24
    assert torch.equal(m.mask, m_old.mask) and torch.equal(m.keep_lens, m_old.keep_lens)
    for i, n in enumerate(m.keep_lens.tolist()):
        # other padding = other GEMM shapes = other blocking: last bits differ per host (patch embed + 4 blocks)
        assert_close_scaled(lat[i, : 1 + n], lat_old[i, : 1 + n], depth=5, msg=f"latent {i}")
    assert key_mask.sum(1).tolist() == [1 + n for n in m.keep_lens.tolist()]
    assert_close_scaled(pred, pred_old, depth=8, msg="prediction")  # encoder 5 + decoder embed, 2 blocks, head


def test_ratio_range_forward_has_no_graph_break():
    """No host sync in masking → torch.compile traces masking + encoder + decoder as one graph."""
    import torch._dynamo

    from mcf.models import Objective, create_model

    model = create_model("mcf_vit_tiny", teacher_checkpoint="random", depth=1, decoder_depth=1,
                         objective=Objective(mask_ratio_range=(0.6, 0.9)))
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    ratios = model._draw_ratios(2, x.device)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda x, n, r: model.online(x, 0.6, n, r).pred)(x, noise, ratios)
    assert explained.graph_break_count == 0, [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_count == 1
