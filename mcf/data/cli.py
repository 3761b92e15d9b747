"""``mcf data``: build-lmdb, build-shards, index, verify, info, builtin. Nothing heavy is imported at module level."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="Build, verify and inspect data sets.", description="Data set tools.")
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    b = sub.add_parser("build-lmdb", help="Convert an image folder into an mcf LMDB (resumable, atomic).")
    b.add_argument("src", metavar="SRC", help="image folder (recursive: JPEG, PNG, WebP, ...)")
    b.add_argument("out", metavar="OUT", help="output LMDB directory (OUT.partial while building)")
    b.add_argument("--workers", type=int, default=2, help="decoding processes (default 2)")
    b.add_argument(
        "--resize-short", type=int, default=None, metavar="PX", help="shrink the short side to PX (re-encodes as JPEG)"
    )
    b.add_argument(
        "--quality",
        type=int,
        default=None,
        help="re-encode every image as JPEG of this quality (default: keep the bytes)",
    )
    b.add_argument("--chunk-size", type=int, default=512, help="files per committed transaction (resume granularity)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=_build_lmdb)

    s = sub.add_parser(
        "build-shards", help="Write an image folder or LMDB as webdataset tar shards (resumable, atomic)."
    )
    s.add_argument("src", metavar="SRC", help="image folder, mcf LMDB, the paper's LMDB (with --lmdb-keys) or shards")
    s.add_argument("out", metavar="OUT", help="output folder of NNNNN.tar shards (OUT.partial while building)")
    s.add_argument("--lmdb-keys", default=None, help="key list file of the paper's LMDB layout")
    s.add_argument(
        "--max-count", type=int, default=10_000, help="samples per shard (default %(default)s; 0 = no count limit)"
    )
    s.add_argument(
        "--max-bytes", type=_size, default=None, help="bytes per shard, e.g. 1G or 500M (default: no byte limit)"
    )
    s.add_argument("--workers", type=int, default=2, help="decoding processes (default 2)")
    s.add_argument(
        "--resize-short", type=int, default=None, metavar="PX", help="shrink the short side to PX (re-encodes as JPEG)"
    )
    s.add_argument(
        "--quality",
        type=int,
        default=None,
        help="re-encode every image as JPEG of this quality (default: keep the bytes)",
    )
    s.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=_build_shards)

    x = sub.add_parser("index", help="Build (or refresh) the cached index of an image folder, key list or shard set.")
    x.add_argument(
        "path",
        metavar="PATH",
        help="image folder, shards (pattern, folder, list, pipe:/URL), or an LMDB with --lmdb-keys",
    )
    x.add_argument("--lmdb-keys", default=None, help="key list file of the paper's LMDB layout")
    x.add_argument(
        "--index-cache",
        default=None,
        metavar="DIR",
        help="write the index into DIR (read-only data; = data.index_cache)",
    )
    x.add_argument("--rebuild", action="store_true", help="rebuild even when the index is fresh")
    x.add_argument("--workers", type=int, default=8, help="processes reading shard headers (default 8)")
    x.set_defaults(func=_index)

    v = sub.add_parser(
        "verify", help="Decode every image of a data set and report the bad ones (exit status 1 if any)."
    )
    v.add_argument("path", metavar="PATH", help="image folder, mcf LMDB, paper LMDB (with --lmdb-keys) or 'builtin'")
    v.add_argument("--lmdb-keys", default=None, help="key list file of the paper's LMDB layout")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    v.set_defaults(func=_verify)

    i = sub.add_parser("info", help="Print count, sizes and provenance of a data set.")
    i.add_argument("path", metavar="PATH", help="image folder, mcf LMDB, paper LMDB (with --lmdb-keys) or 'builtin'")
    i.add_argument("--lmdb-keys", default=None, help="key list file of the paper's LMDB layout")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=_info)

    g = sub.add_parser("builtin", help="Write the built-in real faces (scikit-image) as an mcf LMDB.")
    g.add_argument("out", metavar="OUT", help="output LMDB directory")
    g.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    g.set_defaults(func=_builtin)


def _build_lmdb(args: argparse.Namespace) -> int:
    from mcf.data.tools.lmdb_build import BAD_REPORT, build_lmdb

    m = build_lmdb(
        args.src,
        args.out,
        workers=args.workers,
        resize_short=args.resize_short,
        quality=args.quality,
        chunk_size=args.chunk_size,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(f"wrote {m['count']} images to {args.out}")
    if m["bad"]:
        print(f"{len(m['bad'])} bad files left out (listed in {args.out}/{BAD_REPORT}), e.g.:")
        for rel, reason in m["bad"][:10]:
            print(f"  {rel}: {reason}")
    return 0


def _size(text: str) -> int:
    """``1G``, ``500M``, ``64KiB``, ``1048576`` -> bytes (binary units)."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1G, 500M, 1048576)")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


def _build_shards(args: argparse.Namespace) -> int:
    from mcf.data.tools.shards_build import BAD_REPORT, build_shards

    m = build_shards(
        args.src,
        args.out,
        lmdb_keys=args.lmdb_keys,
        max_count=args.max_count or None,
        max_bytes=args.max_bytes,
        workers=args.workers,
        resize_short=args.resize_short,
        quality=args.quality,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    print(f"wrote {m['count']} images in {len(m['shards'])} shards to {args.out}")
    if m["bad"]:
        print(f"{len(m['bad'])} bad files left out (listed in {args.out}/{BAD_REPORT}), e.g.:")
        for name, reason in m["bad"][:10]:
            print(f"  {name}: {reason}")
    return 0


def _index(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from mcf.data.core.index import IndexOptions, open_key_list
    from mcf.data.formats.shards import is_shard_spec, open_shard_index, resolve_shards
    from mcf.errors import DataError

    opts = IndexOptions(cache_dir=args.index_cache, rebuild=args.rebuild)
    if args.lmdb_keys:
        keys = open_key_list(args.lmdb_keys, opts)
        n, path, what = len(keys), keys._source[0].path if keys._source else None, "keys"
    elif is_shard_spec(args.path):
        table = open_shard_index(resolve_shards(args.path), opts, workers=args.workers)
        n, path = table.total, table.idx.path
        damaged = [k for k in range(len(table)) if table.damage(k)]
        what = f"image samples in {len(table)} shards" + (
            f" ({len(damaged)} damaged: see `mcf data verify`)" if damaged else ""
        )
    elif Path(args.path).is_dir() and not (Path(args.path) / "data.mdb").exists():
        from mcf.data.formats.scan import open_folder_index

        fi = open_folder_index(args.path, opts)
        n, path, what = len(fi), fi.idx.path, "images"
    else:
        raise DataError(
            f"{args.path} needs no index (an mcf LMDB derives its keys); for the paper's layout pass --lmdb-keys"
        )
    size = os.path.getsize(path) if path else 0
    print(f"{n} {what}; index {path or '(not written)'}: {size / max(n, 1):.1f} bytes per sample")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from mcf.data.formats.shards import is_shard_spec
    from mcf.data.tools.lmdb_build import verify_dataset

    if args.lmdb_keys is None and is_shard_spec(args.path):
        from mcf.data.tools.shards_build import verify_shards

        r = verify_shards(args.path, progress=not args.no_progress)
    else:
        r = verify_dataset(args.path, args.lmdb_keys, progress=not args.no_progress)
    for name, reason in r["bad"]:
        print(f"BAD {name}: {reason}")
    print(f"{r['count']} images, {len(r['bad'])} bad")
    return 1 if r["bad"] else 0


def _info(args: argparse.Namespace) -> int:
    from mcf.data.formats.shards import is_shard_spec
    from mcf.data.tools.lmdb_build import dataset_info

    if args.lmdb_keys is None and is_shard_spec(args.path):
        from mcf.data.tools.shards_build import shards_info

        info = shards_info(args.path)
    else:
        info = dataset_info(args.path, args.lmdb_keys)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    where = f" in {info['shards']} shards" if "shards" in info else ""
    print(
        f"{info['path']}: {info['kind']}, {info['count']} images{where}, {info['disk_bytes'] / 2**20:.1f} MiB on disk"
    )
    for url, damage in info.get("damaged_shards") or []:
        print(f"damaged shard {url}: {damage}")
    sizes = [s for s in info["sizes"] if s]
    if sizes:
        ws, hs = [s[0] for s in sizes], [s[1] for s in sizes]
        print(f"sizes of the first {len(sizes)}: {min(ws)}..{max(ws)} x {min(hs)}..{max(hs)} px")
    for name, (a, b) in (info.get("splits") or {}).items():
        print(f"split {name}: {b - a} images [{a}, {b})")
    for p in info.get("provenance") or []:
        print("provenance: " + ", ".join(f"{k}={v}" for k, v in p.items()))
    return 0


def _builtin(args: argparse.Namespace) -> int:
    from mcf.data.formats.builtin import build_builtin

    out = build_builtin(args.out, overwrite=args.overwrite)
    print(f"wrote the built-in faces to {out}")
    return 0
