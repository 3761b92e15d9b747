"""Tools that build, verify and inspect data sets: our LMDB (``lmdb_build``) and webdataset shards
(``shards_build``). Used by ``mcf data`` (:mod:`mcf.data.cli`); nothing in training imports them.
"""
