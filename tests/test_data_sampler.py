"""The sampler (a Feistel order per epoch, a global offset re-split over any world size) and the
transform parameters: bijection, determinism, disjoint covering shares, exact and re-split resume."""

import numpy as np
import pytest
from tolerances import assert_close_scaled

from mcf.data import DistributedSampler, build_transform
from mcf.data.core.sampler import FeistelPermutation


def _share(n, rank, world, seed=0, epoch=0):
    s = DistributedSampler(n, rank=rank, world_size=world, seed=seed)
    s.set_epoch(epoch)
    return [i for _, i in s]


def _order(n, seed, epoch):
    return FeistelPermutation(n, seed, epoch)(np.arange(n)).tolist()


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 8, 9, 31, 32, 33, 1000, 4097, 65_537])
def test_order_is_a_permutation(n):
    for seed, epoch in ((0, 0), (1, 0), (0, 1), (2**40 + 3, 7)):
        assert sorted(_order(n, seed, epoch)) == list(range(n))


def test_order_looks_random():
    """Over 400 epochs of n=1000: where index 0 lands is spread evenly, the order is uncorrelated with
    the dataset order, and a permutation has about one fixed point (as a uniform one does)."""
    n = 1000
    orders = np.array([_order(n, 7, e) for e in range(400)])
    where0 = np.argmax(orders == 0, axis=1)
    counts, _ = np.histogram(where0, bins=10, range=(0, n))
    assert counts.min() > 15 and counts.max() < 65  # 40 expected per bin
    corr = [np.corrcoef(np.arange(n), o)[0, 1] for o in orders]
    assert abs(np.mean(corr)) < 0.01 and np.std(corr) < 0.05  # ~1/sqrt(n) = 0.032
    assert 0.6 < np.mean(orders == np.arange(n)) * n < 1.4


def test_order_costs_no_memory_per_sample():
    perm = FeistelPermutation(20_000_000, 0, 0)
    assert all(v.nbytes < 100 for v in vars(perm).values() if isinstance(v, np.ndarray))
    got = perm(np.array([0, 19_999_999, 123_456]))
    assert got.dtype == np.int64 and ((0 <= got) & (got < 20_000_000)).all() and len(set(got.tolist())) == 3
    with pytest.raises(IndexError):
        perm(np.array([20_000_000]))


@pytest.mark.parametrize("n", [20, 23])
def test_two_ranks_disjoint_and_covering(n):
    a, b = _share(n, 0, 2), _share(n, 1, 2)
    assert len(a) == len(b) == n // 2
    assert not set(a) & set(b)
    union = set(a) | set(b)
    assert len(union) == 2 * (n // 2)
    if n % 2 == 0:
        assert union == set(range(n))
    # round-robin over the epoch's order
    order = _order(n, 0, 0)
    assert a == order[0 : 2 * (n // 2) : 2] and b == order[1 : 2 * (n // 2) : 2]


def test_same_seed_same_order_other_seed_or_epoch_differs():
    assert _share(50, 0, 2, seed=3) == _share(50, 0, 2, seed=3)
    assert _share(50, 0, 2, seed=3) != _share(50, 0, 2, seed=4)
    assert _share(50, 0, 2, seed=3, epoch=0) != _share(50, 0, 2, seed=3, epoch=1)
    assert sorted(_share(50, 0, 1, epoch=1)) == list(range(50))
    s = DistributedSampler(50, shuffle=False)
    assert [i for _, i in s] == list(range(50))


def test_epoch_leftovers_rotate():
    # 23 samples on 2 ranks: one is left out per epoch, but not always the same one.
    left = {(set(range(23)) - set(_share(23, 0, 2, epoch=e)) - set(_share(23, 1, 2, epoch=e))).pop() for e in range(6)}
    assert len(left) > 1


def test_same_world_size_resume_is_exact():
    s = DistributedSampler(30, rank=1, world_size=2, seed=7)
    s.set_epoch(2)
    full = list(s)
    s.load_state_dict({"epoch": 2, "offset": 6 * 2})  # 6 samples of each of the 2 ranks consumed
    assert list(s) == full[6:]
    assert len(s) == len(full) - 6
    with pytest.raises(ValueError):
        s.set_offset(31)


def _consume(n, seed, epoch, offset, world, batch, batches):
    """What ``world`` ranks consume in ``batches`` batches of ``batch`` from ``offset``: per-rank
    lists of indices (in the order each rank reads them) and the new global offset."""
    got = [
        DistributedSampler(n, rank=r, world_size=world, seed=seed).take(epoch, offset, 0, batch * batches)
        for r in range(world)
    ]
    return [g.tolist() for g in got], offset + batches * batch * world


def _check_resplit(n, seed, plan):
    """``plan``: successive (world, batch, batches or None = to the end of the epoch) stretches of
    one epoch, each resumed from the previous one's global offset. Every stretch's ranks get equal,
    disjoint shares; together the stretches read the prefix of the epoch's order exactly once, and
    what is left unread is fewer samples than the last stretch's global batch."""
    order = _order(n, seed, 3)
    offset, seen = 0, []
    for world, batch, batches in plan:
        left = (n - offset) // world // batch
        batches = left if batches is None else min(batches, left)
        shares, new_offset = _consume(n, seed, 3, offset, world, batch, batches)
        assert all(len(sh) == batch * batches for sh in shares)
        # the stretch reads exactly the next positions of the order, in round-robin
        flat = [shares[r][j] for j in range(batch * batches) for r in range(world)]
        assert flat == order[offset:new_offset]
        seen += flat
        offset = new_offset
    assert len(seen) == len(set(seen)) == offset  # nothing twice
    assert seen == order[:offset]  # nothing skipped before the end
    world, batch, _ = plan[-1]
    if plan[-1][2] is None:
        assert n - offset < world * batch  # the tail that cannot fill one more global batch


@pytest.mark.parametrize("plan", [
    [(2, 4, 2), (1, 4, None)],  # 2 ranks -> 1
    [(1, 4, 4), (2, 4, None)],  # 1 -> 2
    [(4, 3, 1), (3, 2, 2), (7, 1, None)],  # grow and shrink, batch size changes too
    [(8, 2, 0), (5, 2, None)],  # interrupted before the first batch
    [(3, 5, 3), (3, 5, None)],  # the same world size: the old split exactly
])
def test_resplit_examples(plan):
    _check_resplit(97, 11, plan)


def test_resplit_random_plans():
    """Property test over 400 random (n, world sizes, batch sizes, interruption points)."""
    rng = np.random.default_rng(2024)
    for _ in range(400):
        n = int(rng.integers(1, 400))
        plan = []
        for _ in range(int(rng.integers(1, 4))):
            plan.append((int(rng.integers(1, 9)), int(rng.integers(1, 6)), int(rng.integers(0, 6))))
        plan.append((int(rng.integers(1, 9)), int(rng.integers(1, 6)), None))
        _check_resplit(n, int(rng.integers(0, 2**31)), plan)


def test_resplit_shares_after_offset_cover_the_rest():
    """Without batching: from any offset, W' ranks' shares are disjoint, equal, and together with the
    consumed prefix leave out only the last (n - offset) % W' positions."""
    rng = np.random.default_rng(5)
    for _ in range(300):
        n, w = int(rng.integers(1, 300)), int(rng.integers(1, 12))
        offset = int(rng.integers(0, n + 1))
        order = _order(n, 1, 0)
        shares = [
            DistributedSampler(n, rank=r, world_size=w, seed=1).take(0, offset, 0, (n - offset) // w).tolist()
            for r in range(w)
        ]
        rest = [i for sh in shares for i in sh]
        assert len(rest) == len(set(rest)) == w * ((n - offset) // w)
        assert set(rest) == set(order[offset : offset + len(rest)])
        assert not set(rest) & set(order[:offset])


def test_transform_params_deterministic_per_sample():
    t = build_transform(32, random_resized_crop=True, crop_scale=(0.2, 1.0))
    p = [t.params(60, 40, seed=1, epoch=0, index=i) for i in range(200)]
    assert p == [t.params(60, 40, seed=1, epoch=0, index=i) for i in range(200)]
    assert p != [t.params(60, 40, seed=1, epoch=1, index=i) for i in range(200)]
    flips = np.mean([q.flip for q in p])
    assert 0.35 < flips < 0.65
    for q in p:
        x0, y0, x1, y1 = q.box
        assert 0 <= x0 < x1 <= 60 and 0 <= y0 < y1 <= 40
        assert 0.2 * 2400 * 0.9 <= (x1 - x0) * (y1 - y0) <= 2400
    plain = build_transform(32, hflip=False)
    assert all(plain.params(60, 40, seed=1, epoch=0, index=i).box == (0, 0, 60, 40) for i in range(20))
    assert not any(plain.params(60, 40, seed=1, epoch=0, index=i).flip for i in range(20))


def test_transform_output_normalised():
    from PIL import Image

    t = build_transform(16, hflip=False)
    x = t(Image.new("RGB", (40, 30), (124, 116, 104)))  # ~ the ImageNet mean colour
    assert x.shape == (3, 16, 16) and str(x.dtype) == "torch.float32"
    assert float(x.abs().max()) < 0.01
    # A flip of a left/right gradient mirrors the output.
    a = np.tile(np.linspace(0, 255, 40, dtype=np.uint8)[None, :, None], (30, 1, 3))
    tf = build_transform(16, hflip=True)
    flipped = [i for i in range(20) if tf.params(40, 30, seed=0, epoch=0, index=i).flip]
    kept = [i for i in range(20) if not tf.params(40, 30, seed=0, epoch=0, index=i).flip]
    y0 = tf(Image.fromarray(a), index=kept[0])
    y1 = tf(Image.fromarray(a), index=flipped[0])
    # 8-bit resampling is integer arithmetic; only the fp32 normalisation rounds (x/255 - mean) / std
    assert_close_scaled(y0.numpy()[:, :, ::-1].copy(), y1.numpy(), dtype=np.float32, depth=2)
