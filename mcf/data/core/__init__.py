"""The bottom of :mod:`mcf.data`: what every dataset format and loader stands on, importing nothing
above it: decoding (``decode``), the cached compact indexes (``index``), the epoch orders
(``sampler``), the transform (``transforms``), worker processes (``workers``, ``procs``), the
per-sample source the loaders' workers run (``source``), tar members (``tar_index``) and the
``data`` config section (``config``).

Kept free of imports so that DALI's spawned source workers, which import ``core.source``, pay
only for what that module needs.
"""
