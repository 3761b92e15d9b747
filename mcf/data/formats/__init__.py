"""Dataset formats over :mod:`mcf.data.core`: image folders (``scan``), our LMDB and the paper's
(``datasets``, checked by ``lmdb_check``), webdataset shards (``shards``), the built-in real faces
(``builtin``), and :func:`~mcf.data.formats.factory.open_dataset`, which opens any of them by path.
"""
