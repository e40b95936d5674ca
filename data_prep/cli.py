"""``mink-ssl-prep``: one command for every dataset, one subcommand per dataset.

    mink-ssl-prep scannet --raw scans/ --out data/scannet_pairs [--frame-skip 25]
                          [--min-overlap 0.3] [--workers N] [--scenes scene0000_00 ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _scannet(args) -> int:
    from data_prep.scannet.prep import PrepParams, run

    params = PrepParams(frame_skip=args.frame_skip, min_overlap=args.min_overlap,
                        max_depth=args.max_depth, min_points=args.min_points)
    manifest = run(args.raw, args.out, params, workers=args.workers, scenes=args.scenes,
                   progress=not args.no_progress)
    return 0 if manifest["counts"]["scenes_done"] else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mink-ssl-prep", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    s = sub.add_parser("scannet", help="ScanNet .sens / exported frames -> fragments and pairs",
                       description="Fragments every --frame-skip frames, the overlap of every "
                       "pair of fragments of a scene, and the pairs at >= --min-overlap.")
    s.add_argument("--raw", type=Path, required=True,
                   help="directory of scenes (ScanNet's scans/); each holds <scene>.sens or "
                   "exported color/ depth/ pose/ intrinsic/ folders")
    s.add_argument("--out", type=Path, required=True, help="output directory (resumable)")
    s.add_argument("--frame-skip", type=int, default=25,
                   help="take frames whose sequence index is a multiple of this (default 25; "
                   "use 1 for exports that are already subsampled)")
    s.add_argument("--min-overlap", type=float, default=0.3,
                   help="keep pairs with overlap ratio >= this (default 0.3)")
    s.add_argument("--max-depth", type=float, default=None,
                   help="ignore depth beyond this many metres (default: keep all, as the original)")
    s.add_argument("--min-points", type=int, default=1000,
                   help="skip frames with fewer valid depth points (default 1000)")
    s.add_argument("--workers", type=int, default=1, help="parallel scene workers (default 1)")
    s.add_argument("--scenes", nargs="+", default=None, help="only these scene names")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=_scannet)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"mink-ssl-prep: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
