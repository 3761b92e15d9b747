"""Benchmarks (``mcf bench``): the paper's training step against mcf's (``step``, ``e2e``), the
loaders (``data``), the attention kernels (``attention``) and ZeRO sharding (``scale``).

Each writes JSON; ``benchmarks/RESULTS.md`` quotes the measured figures with date, device, command
and commit. Modules: :mod:`~mcf.bench.common` (run metadata, JSON), :mod:`~mcf.bench.feeds`,
:mod:`~mcf.bench.step`, :mod:`~mcf.bench.data`, :mod:`~mcf.bench.attention`, :mod:`~mcf.bench.scale`
(+ :mod:`~mcf.bench.scale_worker`). They stand on :mod:`mcf.measure` (device, timing, matmul peak,
peak memory) and :mod:`mcf.models.flops`, which training uses too.
"""
