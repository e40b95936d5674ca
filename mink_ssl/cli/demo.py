"""``make demo`` / ``mink-ssl-demo``: the main job end to end on synthetic ScanNet scenes (the
steps: :mod:`mink_ssl.tools.demo`)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mink_ssl.tools.demo import __doc__ as DOC, run_demo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mink-ssl-demo", description=DOC.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory")
    p.add_argument("--scenes", type=int, default=3, help="synthetic scenes to generate")
    p.add_argument("--frames", type=int, default=150, help="frames per synthetic scene")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="Res16UNet34C", help="backbone name (default Res16UNet34C)")
    p.add_argument("--voxel-size", type=float, default=0.025, help="voxel edge in metres")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    p.add_argument("--pretrain-iterations", type=int, default=None,
                   help="pretraining iterations on the prepared pairs (default: the preset's; "
                        "0 skips pretraining and fine-tuning)")
    p.add_argument("--finetune-iterations", type=int, default=None,
                   help="fine-tuning iterations (default: the preset's; 0 skips the step)")
    p.add_argument("--preset", default="demo",
                   help="synthetic transfer benchmark preset sizing steps 3 and 5 (demo, tiny)")
    p.add_argument("--objective", nargs="+", default=["point_info_nce"],
                   help="pretraining objective(s) by name, e.g. point_info_nce gmm_likelihood")
    p.add_argument("--engine", help="sparse engine: spconv or minkowski (default: the preset's)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        run_demo(args.out, args.scenes, args.frames, args.seed, args.model, args.voxel_size,
                 args.repeats, args.device, args.pretrain_iterations, tuple(args.objective),
                 args.preset, args.finetune_iterations, engine=args.engine)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"mink-ssl-demo: error: {e}", file=sys.stderr)
        return 2
    print(f"demo done in {time.perf_counter() - t0:.1f} s; outputs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
