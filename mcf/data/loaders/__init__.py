"""Pre-training loaders over :mod:`mcf.data.formats`: the :class:`~mcf.data.loaders.base.PretrainLoader`
base, its PyTorch (``torch_loader``), DALI (``dali_loader``, checked at start by ``dali_check``) and
remote-shard (``shard_stream``) implementations, and :func:`~mcf.data.loaders.factory.build_pretrain_loader`,
which picks one.
"""
