"""DistributedSampler and the transform parameters: determinism, disjoint covering shares, resume."""

import numpy as np
import pytest

from mcf.data import DistributedSampler, build_transform


def _share(n, rank, world, seed=0, epoch=0):
    s = DistributedSampler(n, rank=rank, world_size=world, seed=seed)
    s.set_epoch(epoch)
    return [i for _, i in s]


@pytest.mark.parametrize("n", [20, 23])
def test_two_ranks_disjoint_and_covering(n):
    a, b = _share(n, 0, 2), _share(n, 1, 2)
    assert len(a) == len(b) == n // 2
    assert not set(a) & set(b)
    union = set(a) | set(b)
    assert len(union) == 2 * (n // 2)
    if n % 2 == 0:
        assert union == set(range(n))


def test_same_seed_same_order_other_seed_or_epoch_differs():
    assert _share(50, 0, 2, seed=3) == _share(50, 0, 2, seed=3)
    assert _share(50, 0, 2, seed=3) != _share(50, 0, 2, seed=4)
    assert _share(50, 0, 2, seed=3, epoch=0) != _share(50, 0, 2, seed=3, epoch=1)
    assert sorted(_share(50, 0, 1, epoch=1)) == list(range(50))


def test_epoch_leftovers_rotate():
    # 23 samples on 2 ranks: one is left out per epoch, but not always the same one.
    left = {(set(range(23)) - set(_share(23, 0, 2, epoch=e)) - set(_share(23, 1, 2, epoch=e))).pop() for e in range(6)}
    assert len(left) > 1


def test_set_start_resumes_exactly():
    s = DistributedSampler(30, rank=1, world_size=2, seed=7)
    s.set_epoch(2)
    full = list(s)
    s.load_state_dict({"epoch": 2, "start": 6})
    assert list(s) == full[6:]
    assert len(s) == len(full) - 6
    with pytest.raises(ValueError):
        s.set_start(99)


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
    assert np.allclose(y0.numpy()[:, :, ::-1], y1.numpy())
