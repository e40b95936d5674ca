"""``mink-ssl-transfer``: the synthetic transfer benchmark (:mod:`mink_ssl.tools.transfer_benchmark`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mink_ssl.tools.transfer_benchmark import PRESETS, SCRATCH, __doc__ as DOC, run_benchmark


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=DOC.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--preset", default="full", help=f"one of {sorted(PRESETS)}")
    p.add_argument("--objectives", nargs="+", help=f"objectives; '{SCRATCH}' is from scratch")
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--settings", nargs="+", help="pts<N>, frac<F> or full")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--engine", help="sparse engine of every run: spconv or minkowski (default: "
                   "the preset's)")
    args = p.parse_args(argv)
    try:
        result = run_benchmark(args.out, args.preset, objectives=args.objectives,
                               seeds=args.seeds, settings=args.settings, device=args.device,
                               engine=args.engine)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"mink-ssl-transfer: error: {e}", file=sys.stderr)
        return 2
    return 3 if "incomplete" in result else 0  # 3: other processes still run some of it


if __name__ == "__main__":
    sys.exit(main())
