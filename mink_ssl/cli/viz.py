"""``mink-ssl-viz``: look at training pairs and at what a backbone learned (PLY + PNG files).

    mink-ssl-viz pair --data data/scannet_pairs --index 0 --out viz/
                      [--voxel-size 0.025] [--max-lines 500] [--no-augment] [--color rgb|tint]
    mink-ssl-viz features --model runs/pretrain/backbone.pth --data data/scannet_pairs
                          --fragment scene0000_00/000025 --out viz/ [--voxel-size 0.025]
    mink-ssl-viz features --random-init Res16UNet14A ...   (an untrained network, to compare)

PLY files open in MeshLab, CloudCompare or Open3D (pair lines: ``open3d.io.read_line_set``);
PNG snapshots are rendered in software, so no display or GPU is needed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROG = "mink-ssl-viz"


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
        if w < 16 or h < 16:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT like 800x600, got {text!r}")
    return w, h


def _pair(args) -> int:
    from mink_ssl.tools.viz import visualize_pair

    res = visualize_pair(args.data, args.index, args.out, voxel_size=args.voxel_size,
                         max_lines=args.max_lines, augment=not args.no_augment, color=args.color,
                         epoch=args.epoch, seed=args.seed, size=args.size,
                         point_size=args.point_size)
    n0, n1 = res["voxels"]
    print(f"pair {args.index}: {res['names'][0]} ({n0:,} voxels) <-> {res['names'][1]} "
          f"({n1:,} voxels), {res['matches']:,} matches, {res['lines']} drawn")
    print(f"wrote {res['ply']}\nwrote {res['png']}")
    return 0


def _features(args) -> int:
    import torch

    from mink_ssl.models import build_model, load_model
    from mink_ssl.tools.viz import resolve_device, visualize_features

    if args.model is not None:
        if not args.model.is_file():
            raise FileNotFoundError(f"model file {args.model} does not exist: pass a backbone "
                                    "saved by pretraining (<run>/backbone.pth) or use "
                                    "--random-init NAME for an untrained network")
        model = load_model(args.model, engine=args.engine)
        label = str(args.model)
    else:
        torch.manual_seed(args.seed)
        model = build_model(args.random_init, in_channels=args.in_channels,
                            out_channels=args.out_channels,
                            **({"engine": args.engine} if args.engine else {}))
        label = f"{args.random_init} (random init, seed {args.seed})"
    device = resolve_device(args.device)
    res = visualize_features(model, args.data, args.fragment, args.out,
                             voxel_size=args.voxel_size, device=device, size=args.size,
                             point_size=args.point_size)
    print(f"{label} on {res['fragment']}: {res['voxels']:,} voxels, {res['channels']} "
          f"channels -> PCA colours ({device})")
    for key in ("features_ply", "features_png", "rgb_ply", "rgb_png"):
        print(f"wrote {res[key]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(s):
        s.add_argument("--data", type=Path, required=True,
                       help="output directory of `mink-ssl-prep scannet`")
        s.add_argument("--out", type=Path, required=True, help="directory for the PLY/PNG files")
        s.add_argument("--voxel-size", type=float, default=0.025,
                       help="voxel edge in metres (default 0.025)")
        s.add_argument("--size", type=_size, default=(800, 600),
                       help="snapshot size WIDTHxHEIGHT (default 800x600)")
        s.add_argument("--point-size", type=int, default=None,
                       help="splat size in pixels (default: about one voxel)")

    s = sub.add_parser("pair", help="a training pair: both views and their correspondences",
                       description="Pair K of the dataset as training sees it: view 0, view 1 "
                       "shifted sideways, and lines for a random subset of the matches.")
    common(s)
    s.add_argument("--index", type=int, required=True,
                   help="pair index (line of pairs.txt, 0-based)")
    s.add_argument("--max-lines", type=int, default=500,
                   help="correspondence lines to draw, a random subset (default 500)")
    s.add_argument("--no-augment", action="store_true",
                   help="no random rotation (views are only centred)")
    s.add_argument("--color", choices=("rgb", "tint"), default="rgb",
                   help="point colours: their RGB, or tinted per view (orange / blue)")
    s.add_argument("--epoch", type=int, default=0, help="augmentation epoch (default 0)")
    s.add_argument("--seed", type=int, default=0, help="augmentation seed (default 0)")
    s.set_defaults(func=_pair)

    s = sub.add_parser("features", help="a fragment coloured by the PCA of backbone features",
                       description="Run a backbone on one fragment's voxels and colour them by "
                       "the first three principal components of its output features.")
    common(s)
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", type=Path, help="backbone file (save_model / pretraining's "
                       "backbone.pth)")
    which.add_argument("--random-init", metavar="NAME",
                       help="an untrained network of this name instead, e.g. Res16UNet14A")
    s.add_argument("--fragment", required=True, help="scene/frame, e.g. scene0000_00/000025")
    s.add_argument("--in-channels", type=int, default=3,
                   help="with --random-init: 3 (rgb) or 1 (ones) (default 3)")
    s.add_argument("--out-channels", type=int, default=32,
                   help="with --random-init: output channels (default 32)")
    s.add_argument("--seed", type=int, default=0, help="with --random-init: weight seed (0)")
    s.add_argument("--engine", default=None, help="sparse engine: spconv or minkowski (default: "
                   "the model file's; with --random-init the default engine)")
    s.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:i]")
    s.set_defaults(func=_features)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError, IndexError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
