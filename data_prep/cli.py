"""``mink-ssl-prep``: one command for every dataset, one subcommand per dataset.

    mink-ssl-prep scannet --raw scans/ --out data/scannet_pairs [--frame-skip 25]
                          [--min-overlap 0.3] [--workers N] [--scenes scene0000_00 ...]
                          [--invalid-depth 65535] [--verify-pairs 32]
                          [--shard I/N | --finalize] [--claim-timeout 600]
    mink-ssl-prep s3dis --raw Stanford3dDataset_v1.2_Aligned_Version --out data/s3dis
                        [--test-area 5] [--stairs ignore|clutter] [--no-room-check]
    mink-ssl-prep synthia --raw Synthia4D --out data/synthia [--keep-axes]
    mink-ssl-prep scannet-seg --raw scans/ [scans_test/] --splits-dir Tasks/Benchmark
                              --out data/scannet_seg [--labels auto|ply|aggregation]
                              [--label-map scannetv2-labels.combined.tsv]
    mink-ssl-prep scannet-det --raw scans/ --label-map scannetv2-labels.combined.tsv
                              --out data/scannet_det [--splits-dir Tasks/Benchmark]
    mink-ssl-prep sunrgbd --raw sunrgbd_trainval/ --out data/sunrgbd_det [--labels label]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep.detection import scannet_det, sunrgbd
from data_prep.pairs.prep import (PrepIncomplete, PrepParams, finalize, run as run_pairs,
                                  run_shard)
from data_prep.segmentation import s3dis, scannet_seg, synthia
from mink_ssl.errors import Interrupted, OutputError
from mink_ssl.locks import DirectoryLocked


def shard_arg(text: str) -> tuple[int, int]:
    """``I/N`` -> (I, N), 0 <= I < N."""
    try:
        i, n = (int(v) for v in text.split("/"))
        if n < 1 or not 0 <= i < n:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected I/N with 0 <= I < N, e.g. 0/50 (SLURM: "
            "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT with --array 0-49)") from None
    return i, n


def _scannet(args) -> int:
    params = PrepParams(frame_skip=args.frame_skip, min_overlap=args.min_overlap,
                        max_depth=args.max_depth, min_points=args.min_points,
                        invalid_depth=args.invalid_depth)
    common = dict(scenes=args.scenes, verify_pairs=args.verify_pairs,
                  claim_timeout=args.claim_timeout)
    if args.shard is not None:
        reports = run_shard(args.raw, args.out, params, args.shard, workers=args.workers,
                            progress=not args.no_progress, **common)
        return 1 if any(r.status == "failed" for r in reports) else 0
    if args.finalize:
        manifest = finalize(args.raw, args.out, params, **common)
    else:
        manifest = run_pairs(args.raw, args.out, params, workers=args.workers,
                             progress=not args.no_progress, **common)
    if manifest["failed_scenes"]:  # a self-check disagreement is a bug: never a quiet success
        return 1
    return 0 if manifest["counts"]["scenes_done"] else 1


def _seg_done(manifest: dict) -> int:
    return 0 if manifest["scenes"] else 1


def _s3dis(args) -> int:
    params = s3dis.S3DISParams(test_area=args.test_area, stairs=args.stairs,
                               check_room_file=not args.no_room_check)
    return _seg_done(s3dis.run(args.raw, args.out, params, workers=args.workers,
                               rooms=args.rooms, progress=not args.no_progress))


def _synthia(args) -> int:
    return _seg_done(synthia.run(args.raw, args.out,
                                 synthia.SynthiaParams(keep_axes=args.keep_axes),
                                 workers=args.workers, sequences=args.sequences,
                                 progress=not args.no_progress))


def _scannet_seg(args) -> int:
    return _seg_done(scannet_seg.run(args.raw, args.splits_dir, args.out,
                                     scannet_seg.ScanNetSegParams(args.labels),
                                     label_map=args.label_map, workers=args.workers,
                                     scenes=args.scenes, progress=not args.no_progress))


def _scannet_det(args) -> int:
    return _seg_done(scannet_det.run(args.raw, args.out, args.label_map,
                                     splits_dir=args.splits_dir, scenes=args.scenes,
                                     workers=args.workers, progress=not args.no_progress))


def _sunrgbd(args) -> int:
    return _seg_done(sunrgbd.run(args.raw, args.out, label_dir=args.labels, ids=args.ids,
                                 workers=args.workers, progress=not args.no_progress))


def _common(s: argparse.ArgumentParser) -> None:
    s.add_argument("--out", type=Path, required=True,
                   help="output directory: manifest.json + scenes/*.npz (resumable)")
    s.add_argument("--workers", type=int, default=1, help="parallel scene workers (default 1)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_segmentation(sub) -> None:
    s = sub.add_parser("s3dis", help="S3DIS rooms -> segmentation scenes (13 classes)",
                       description="One scene per room: the points of Annotations/*.txt "
                       "labelled by class; stray bytes of the release are repaired and reported.")
    s.add_argument("--raw", type=Path, required=True,
                   help="the Stanford3dDataset_v1.2_Aligned_Version folder (Area_1 ... Area_6)")
    s.add_argument("--test-area", type=int, default=5, help="held-out area (default 5)")
    s.add_argument("--stairs", choices=("ignore", "clutter"), default="ignore",
                   help="stairs points: label -1 (default, Minkowski / SegCloud) or clutter "
                   "(PointNet)")
    s.add_argument("--no-room-check", action="store_true",
                   help="do not parse <room>.txt to check it against the annotations")
    s.add_argument("--rooms", nargs="+", default=None, help="only these rooms (Area_1/office_1)")
    _common(s)
    s.set_defaults(func=_s3dis)

    s = sub.add_parser("synthia", help="Synthia4D frames -> segmentation scenes (12 classes)",
                       description="One scene per frame PLY of the CVPR'19 split sequences; "
                       "centimetres -> metres, y-up -> z-up.")
    s.add_argument("--raw", type=Path, required=True,
                   help="folder of the Synthia4D sequences (<SEQ>/point_clouds/<frame>.ply)")
    s.add_argument("--keep-axes", action="store_true",
                   help="keep the release's y-up frame (default: rotate to z up)")
    s.add_argument("--sequences", nargs="+", default=None, help="only these split sequences")
    _common(s)
    s.set_defaults(func=_synthia)

    s = sub.add_parser("scannet-seg", help="ScanNet v2 scans -> segmentation scenes (20 classes)",
                       description="One scene per scan of the official split lists: the "
                       "_vh_clean_2 mesh vertices with NYU40 labels mapped to the 20 classes.")
    s.add_argument("--raw", type=Path, nargs="+", required=True,
                   help="ScanNet's scans/ folder (and scans_test/ for the test split)")
    s.add_argument("--splits-dir", type=Path, required=True,
                   help="folder with scannetv2_train.txt, scannetv2_val.txt "
                   "(and scannetv2_test.txt)")
    s.add_argument("--labels", choices=("auto", "ply", "aggregation"), default="auto",
                   help="label source: _vh_clean_2.labels.ply, aggregation + segs JSON, or "
                   "auto (the ply if present; default)")
    s.add_argument("--label-map", type=Path, default=None,
                   help="scannetv2-labels.combined.tsv, to map aggregation raw categories to "
                   "NYU40 ids (without it they must be NYU40 class names)")
    s.add_argument("--scenes", nargs="+", default=None, help="only these scenes")
    _common(s)
    s.set_defaults(func=_scannet_seg)


def _add_detection(sub) -> None:
    s = sub.add_parser("scannet-det", help="ScanNet v2 scans -> detection scenes (18 classes)",
                       description="One scene per annotated scan: the axis-aligned "
                       "_vh_clean_2 mesh vertices, an axis-aligned box per object of VoteNet's "
                       "18 classes, and each vertex's box.")
    s.add_argument("--raw", type=Path, required=True,
                   help="ScanNet's scans/ folder (<scene>/<scene>_vh_clean_2.ply, "
                   ".aggregation.json, _vh_clean_2.0.010000.segs.json, <scene>.txt)")
    s.add_argument("--label-map", type=Path, required=True,
                   help="ScanNet's scannetv2-labels.combined.tsv (raw category -> NYU40 id)")
    s.add_argument("--splits-dir", type=Path, default=None,
                   help="folder with scannetv2_train.txt and scannetv2_val.txt (default: every "
                   "scene in train)")
    s.add_argument("--scenes", nargs="+", default=None, help="only these scenes")
    _common(s)
    s.set_defaults(func=_scannet_det)

    s = sub.add_parser("sunrgbd", help="SUN RGB-D (VoteNet's sunrgbd_trainval) -> detection "
                       "scenes (10 classes)",
                       description="One scene per image of train_data_idx.txt / "
                       "val_data_idx.txt: the upright depth points of depth/<id>.mat, the "
                       "oriented boxes of the 10 classes, and each point's box.")
    s.add_argument("--raw", type=Path, required=True,
                   help="VoteNet's sunrgbd_trainval folder (depth/ label_v1/ calib/ image/ and "
                   "the split files)")
    s.add_argument("--labels", choices=("label_v1", "label"), default="label_v1",
                   help="box annotations: label_v1/ (v1, default: the papers' SUN RGB-D "
                   "numbers are on v1, VoteNet's use_v1) or label/ (v2)")
    s.add_argument("--ids", type=int, nargs="+", default=None, help="only these image ids")
    _common(s)
    s.set_defaults(func=_sunrgbd)


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
    s.add_argument("--invalid-depth", type=int, default=None, metavar="VALUE",
                   help="raw depth value that also marks an invalid pixel besides 0, e.g. 65535 "
                   "for 7-Scenes-style exports (default: only 0, as the original pipeline)")
    s.add_argument("--verify-pairs", type=int, default=32, metavar="N",
                   help="per scene, recompute N sampled pairs by the overlap's definition and "
                   "fail the scene on any disagreement (default 32; 0 turns the check off)")
    s.add_argument("--workers", type=int, default=1, help="parallel scene workers (default 1)")
    s.add_argument("--scenes", nargs="+", default=None, help="only these scene names")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    many = s.add_mutually_exclusive_group()
    many.add_argument("--shard", type=shard_arg, default=None, metavar="I/N",
                      help="one of many processes (machines, SLURM array tasks) filling one "
                      "--out: prepare every N-th scene of the sorted list from the I-th "
                      "(0 <= I < N), one scene per claim; writes no pairs.txt / manifest.json "
                      "(run --finalize once every shard is done). Processes may share a shard "
                      "(0/1 everywhere: all share all scenes)")
    many.add_argument("--finalize", action="store_true",
                      help="after the --shard runs: write pairs.txt and manifest.json from the "
                      "prepared scenes (the same bytes a single run writes); refused while a "
                      "scene is unfinished or being prepared")
    s.add_argument("--claim-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="a scene claimed by a process of another machine counts as abandoned "
                   "this long after its last heartbeat (default 600; on the same machine: as "
                   "soon as the process has ended)")
    s.set_defaults(func=_scannet)
    _add_segmentation(sub)
    _add_detection(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"mink-ssl-prep: error: {e}", file=sys.stderr)
        return 2
    except (OutputError, DirectoryLocked, PrepIncomplete) as e:  # not bad input
        print(f"mink-ssl-prep: error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:  # SIGINT / SIGTERM: finished scenes kept, rerun continues
        print(f"mink-ssl-prep: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
