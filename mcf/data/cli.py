"""``mcf data``: build-lmdb, verify, info, builtin. Nothing heavy is imported at module level."""

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
    b.add_argument("--resize-short", type=int, default=None, metavar="PX", help="shrink the short side to PX (re-encodes as JPEG)")
    b.add_argument("--quality", type=int, default=None, help="re-encode every image as JPEG of this quality (default: keep the bytes)")
    b.add_argument("--chunk-size", type=int, default=512, help="files per committed transaction (resume granularity)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=_build_lmdb)

    v = sub.add_parser("verify", help="Decode every image of a data set and report the bad ones (exit status 1 if any).")
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
    from mcf.data.lmdb_build import BAD_REPORT, build_lmdb

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


def _verify(args: argparse.Namespace) -> int:
    from mcf.data.lmdb_build import verify_dataset

    r = verify_dataset(args.path, args.lmdb_keys, progress=not args.no_progress)
    for name, reason in r["bad"]:
        print(f"BAD {name}: {reason}")
    print(f"{r['count']} images, {len(r['bad'])} bad")
    return 1 if r["bad"] else 0


def _info(args: argparse.Namespace) -> int:
    from mcf.data.lmdb_build import dataset_info

    info = dataset_info(args.path, args.lmdb_keys)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{info['path']}: {info['kind']}, {info['count']} images, {info['disk_bytes'] / 2**20:.1f} MiB on disk")
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
    from mcf.data.builtin import build_builtin

    out = build_builtin(args.out, overwrite=args.overwrite)
    print(f"wrote the built-in faces to {out}")
    return 0
