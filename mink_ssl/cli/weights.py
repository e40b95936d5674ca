"""``mink-ssl-weights``: inspect and convert any weights file, without running code from it.

    mink-ssl-weights inspect hardest_contrastive.pth
    mink-ssl-weights convert hardest_contrastive.pth --out backbone.pth
    mink-ssl-weights convert runs/pt/backbone.pth --to spconv --out spconv.pth
    mink-ssl-weights convert runs/pt/backbone.pth --to pointcept-minkunet --out pointcept.pth

Files are read with the safe reader (:mod:`mink_ssl.models.weight_files`): PointContrast's and
CSC's released checkpoints, our files, any state dict; a file that names code to run is refused.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mink_ssl.models.weight_files import UnsafeFileError, read_weights
from mink_ssl.models.weight_files.convert import TARGETS, convert
from mink_ssl.models.weight_files.layouts import KERNEL_ORDERS, block_kernels


def describe(path: Path, kernel_order: str = "auto") -> dict:
    """What ``inspect`` prints, as plain data."""
    wf = read_weights(path, kernel_order)
    arch = wf.architecture
    return {
        "file": str(path), "bytes": path.stat().st_size, "layout": wf.layout,
        "entry": wf.entry, "prefix_removed": wf.prefix,
        "architecture": arch.get("name"), "architecture_source": wf.architecture_source,
        "same_structure_as": [n for n in wf.equivalent_names if n != arch.get("name")],
        "in_channels": arch.get("in_channels"), "out_channels": arch.get("out_channels"),
        "stem_kernel_size": arch.get("stem_kernel_size"), "iteration": wf.iteration,
        "tensors": len(wf.state_dict), "parameters": wf.parameter_count(),
        "config": config_summary(wf.config), "other_entries": wf.extra,
        "kernel_order": wf.kernel_order, "centre_tap": centre_tap(wf.state_dict),
        "notices": wf.notices,
    }


def centre_tap(state) -> int | None:
    """The tap with the largest mean |weight| over the residual blocks' 3x3x3 kernels (read in
    our order). In trained networks that is usually the centre, our tap 13; a 0 there suggests
    a file in ME 0.4's HYBRID order (centre first) read as ours. Evidence, not proof."""
    import torch

    keys = block_kernels(state)
    if not keys:
        return None
    per_tap = torch.stack([state[k].detach().abs().float().mean(dim=(1, 2)) for k in keys])
    return int(per_tap.mean(0).argmax())


def config_summary(config, limit: int = 16) -> dict | None:
    """The network and optimiser settings of a carried config, flattened (``net.model``...),
    then the number of other settings."""
    if not isinstance(config, dict):
        return None
    flat: dict[str, object] = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif not isinstance(v, (list, tuple)) or len(v) <= 8:
                flat[f"{prefix}{k}"] = v

    walk(config, "")
    first = [k for k in flat if k.split(".")[0] in ("net", "model", "opt", "optimizer")]
    shown = {k: flat[k] for k in (first + [k for k in flat if k not in first])[:limit]}
    if len(flat) > len(shown):
        shown["..."] = f"{len(flat) - len(shown)} more settings"
    return shown


def _print(info: dict) -> None:
    size = info["bytes"] / 2**20
    print(f"file          {info['file']} ({size:.1f} MiB)")
    prefix = f", prefix {info['prefix_removed']!r} removed" if info["prefix_removed"] else ""
    print(f"layout        {info['layout']} (entry {info['entry']!r}{prefix})")
    same = (f"; same structure: {', '.join(info['same_structure_as'])}"
            if info["same_structure_as"] else "")
    print(f"architecture  {info['architecture']} ({info['architecture_source']}{same})")
    print(f"channels      in {info['in_channels']}, out {info['out_channels']}; stem kernel "
          f"{info['stem_kernel_size']}")
    print(f"iteration     {info['iteration']}")
    tap = info["centre_tap"]
    print(f"kernel order  {info['kernel_order']} as read; the blocks' strongest tap is "
          f"{tap} (13 is the centre in our order)" if tap is not None else
          f"kernel order  {info['kernel_order']}")
    print(f"parameters    {info['parameters']:,} in {info['tensors']} tensors")
    for k, v in (info["other_entries"] or {}).items():
        print(f"{k:<13} {v}")
    if info["config"]:
        print("config        " + ", ".join(f"{k}={v}" for k, v in info["config"].items()))
    for notice in info["notices"]:
        print(f"notice        {notice}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mink-ssl-weights", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="architecture, channels, iteration, layout, config")
    ins.add_argument("file", type=Path)
    ins.add_argument("--json", action="store_true", help="print plain JSON")
    order_help = ("tap order of the residual blocks' 3x3x3 kernels in the file: auto (the "
                  "released layouts are ME 0.4 HYBRID, everything else ours), me0.4-hybrid, "
                  "hypercube")
    ins.add_argument("--kernel-order", default="auto", choices=KERNEL_ORDERS, help=order_help)
    conv = sub.add_parser("convert", help="write the weights in another layout")
    conv.add_argument("file", type=Path)
    conv.add_argument("--out", type=Path, required=True, help="file to write (atomically)")
    conv.add_argument("--to", default="mink-ssl", choices=TARGETS,
                      help="mink-ssl: our backbone file (default); spconv: a state dict for "
                           "spconv 2 layers; pointcept-minkunet / pointcept-spunet: Pointcept")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    conv.add_argument("--kernel-order", default="auto", choices=KERNEL_ORDERS, help=order_help)
    args = p.parse_args(argv)
    try:
        if args.command == "inspect":
            info = describe(args.file, args.kernel_order)
            print(json.dumps(info, indent=1, default=str)) if args.json else _print(info)
            return 0
        return _convert(args)
    except UnsafeFileError as e:
        print(f"mink-ssl-weights: refused: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"mink-ssl-weights: error: {e}", file=sys.stderr)
        return 2


def _convert(args) -> int:
    from mink_ssl.io import atomic_torch_save
    from mink_ssl.errors import RERUN

    if args.out.exists() and args.out.resolve() == args.file.resolve():
        raise ValueError(f"--out {args.out} is the input file; write to another path")
    if args.out.exists() and not args.overwrite:
        raise ValueError(f"{args.out} exists; choose another --out or add --overwrite")
    obj, notes = convert(read_weights(args.file, args.kernel_order), args.to)
    atomic_torch_save(obj, args.out, then=RERUN)  # a failed write: rerun this command
    print(f"wrote {args.out} ({args.to})")
    for note in notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
