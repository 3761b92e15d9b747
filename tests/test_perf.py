"""Throughput fields of the metrics records (``mcf.train.perf``): model FLOPs per image counted on the
meta device equal a count of the real step, the GPU peak table, and TFLOP/s = FLOPs/image × images/s."""

from __future__ import annotations

import pytest
import torch

from mcf.config import build_config
from mcf.models import create_model_from_config
from mcf.models.flops import count_flops, use_math_attention
from mcf.train.perf import Throughput, flops_per_image, known_gpu_peak


def test_flops_per_image_is_the_real_steps_count():
    cfg = build_config("demo")
    model = create_model_from_config(cfg).train()
    use_math_attention(model)
    images = torch.randn(2, 3, 32, 32)
    real = count_flops(lambda: model(images).loss.backward()) / 2
    assert flops_per_image(cfg) == real
    cfg.train.activation_checkpointing = "all"  # recomputation is not model work: the same count
    assert flops_per_image(cfg) == real
    ranged = build_config("demo", ["masking.ratio_range=[0.5,0.75]"])  # counted at the largest visible set
    assert flops_per_image(ranged) == flops_per_image(build_config("demo", ["masking.ratio=0.5"])) > real


@pytest.mark.parametrize(
    "name, card, tflops",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756.5),
        ("NVIDIA H100 NVL", "H100 NVL", 835.5),
        ("NVIDIA H200", "H200 SXM", 989.4),
        ("NVIDIA H200 NVL", "H200 NVL", 835.5),
        ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
        ("NVIDIA A100 80GB PCIe", "A100", 312.0),
        ("NVIDIA A10", "A10", 125.0),
        ("NVIDIA L40S", "L40S", 362.05),
        ("NVIDIA L40", "L40", 181.05),
        ("NVIDIA L4", "L4", 121.0),
        ("NVIDIA GeForce RTX 4090", "RTX 4090", 165.2),
        ("NVIDIA B200", "B200", 2250.0),
    ],
)
def test_known_gpu_peaks(name, card, tflops):
    assert known_gpu_peak(name) == (card, tflops)


def test_unknown_gpu_is_measured():
    assert known_gpu_peak("NVIDIA GeForce GTX 1080") is None and known_gpu_peak("Tesla V100-SXM2-16GB") is None


def test_fields_are_consistent():
    t = Throughput(build_config("demo"), torch.device("cpu"), torch.float32, world_size=2)
    f, c = t.fields(images_per_s=123.0), t.params()
    assert f["tflops"] == c["flops_per_image"] * 123.0 / 1e12
    assert f["tflops_per_device"] == f["tflops"] / 2
    assert f["mfu"] == pytest.approx(f["tflops_per_device"] / c["peak_tflops"], rel=1e-12)
    assert c["peak_tflops"] > 0 and f["peak_memory_gb"] > 0 and "CPU" in c["peak_source"]
    assert "flops_per_image" not in f and "peak_tflops" not in f  # constants: logged once, not per record


def test_a_model_the_meta_device_cannot_count_still_trains(monkeypatch):
    import mcf.train.perf as perf

    def broken(cfg):
        raise NotImplementedError("no meta kernel")

    monkeypatch.setattr(perf, "flops_per_image", broken)
    t = Throughput(build_config("demo"), torch.device("cpu"), torch.float32, world_size=1)
    assert set(t.fields(10.0)) == {"peak_memory_gb"}


def test_a_peak_below_the_achieved_rate_is_raised(monkeypatch):
    import mcf.train.perf as perf

    monkeypatch.setattr(perf, "device_peak_flops", lambda device, dtype: (1e6, "a busy host's measurement"))
    t = Throughput(build_config("demo"), torch.device("cpu"), torch.float32, world_size=1)
    f = t.fields(images_per_s=1000.0)  # far above 1 MFLOP/s
    assert f["mfu"] == pytest.approx(1.0) and f["peak_tflops"] == pytest.approx(f["tflops_per_device"])
    assert "raised" in t.peak_source
    assert t.fields(images_per_s=10.0)["mfu"] == pytest.approx(0.01)  # the raised peak holds


def test_peak_sizes_are_fixed_per_dtype(monkeypatch):
    """One method (``matmul_peaks``) and one size per device type and dtype, whatever the other dtype
    measures: bf16 at 512 only where the CPU emulates it."""
    import mcf.measure as common

    calls = []
    monkeypatch.setattr(common, "time_repeats", lambda run, device, repeats: calls.append(repeats) or [1.0] * repeats)
    monkeypatch.setattr(torch, "mm", lambda a, b: calls.append(a.shape[0]))
    for native in (True, False):
        monkeypatch.setattr(common, "native_bf16", lambda device, native=native: native)
        peaks = common.measure_peaks(torch.device("cpu"))
        assert peaks["fp32_n"] == 2048 and peaks["bf16_n"] == (2048 if native else 512)
        assert peaks["fp32"] == 2 * 2048**3  # median of the (fake) 1 s repeats
    assert calls.count(common.PEAK_REPEATS["cpu"]) == 2 * 2 * common.PEAK_ROUNDS["cpu"]  # 2 runs × 2 dtypes × rounds
    assert common.peak_at_least(5.0, 7.0) == (7.0, True) and common.peak_at_least(5.0, 3.0) == (5.0, False)


def test_a_slow_spell_does_not_lower_the_peak_and_the_dtypes_take_turns(monkeypatch):
    """The CI host's slow spells outlast a round of products: the peak is the best round's median,
    and the dtypes' rounds alternate so that one spell cannot cover all of a dtype's rounds."""
    import mcf.measure as common

    order, spell, current = [], {"rounds_left": 2}, {}  # the first two rounds (fp32, then bf16) at half speed

    def timed(run, device, repeats):
        run()  # records the dtype of the product timed
        order.append(common._DTYPE_NAMES[current["dtype"]])
        slow = spell["rounds_left"] > 0
        spell["rounds_left"] -= 1
        return ([2.0, 2.0, 0.5] if slow else [1.0, 1.0, 50.0])[:repeats]  # one odd product per round: the median

    def mm(a, b):
        current["dtype"] = a.dtype

    monkeypatch.setattr(common, "time_repeats", timed)
    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(common, "native_bf16", lambda device: True)
    peaks = common.measure_peaks(torch.device("cpu"))
    assert order == ["fp32", "bf16"] * common.PEAK_ROUNDS["cpu"]
    assert peaks["fp32"] == peaks["bf16"] == 2 * 2048**3  # the 1 s rounds, not the 2 s ones nor one fast product
    both = common.best_peaks({"fp32": 1.0, "fp32_n": 2048}, {"fp32": 3.0, "fp32_n": 2048})
    assert both == {"fp32": 3.0, "fp32_n": 2048}
