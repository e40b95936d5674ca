"""A segmentation run's final evaluation, and ``evaluate_only``: evaluating a fine-tuned model
(``model.pth`` or a checkpoint) on a split after checking it was trained on what the split
gives it."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch.nn as nn

from mink_ssl.data.segmentation import read_seg_manifest
from mink_ssl.eval.segmentation import write_results
from mink_ssl.formats.model_files import SEG_CHECKPOINT_FORMAT, SEG_MODEL_FORMAT, load_tagged
from mink_ssl.models.heads import segmentation_model_from_state
from mink_ssl.tasks.segmentation.config import FinetuneSegConfig, SegDataConfig
from mink_ssl.errors import RERUN, RESUME, OutputError, written_before
from mink_ssl.tasks.segmentation.inference import evaluate_scenes, write_prediction_plys
from mink_ssl.tasks.segmentation.datasets import build_seg_dataset


def load_fine_tuned(path: str | os.PathLike, engine: str | None = None
                    ) -> tuple[nn.Module, dict]:
    """The whole fine-tuned model (backbone + head, strict keys) in ``model.pth`` (format
    ``mink_ssl.seg_model/1``) or in a fine-tuning checkpoint (``mink_ssl.seg_checkpoint/1``),
    and what the file says about its input: ``classes``, ``voxel_size``, ``features`` and
    ``iterations``, None where it does not say (a checkpoint has no class names, and no voxel
    size when its run took the manifest's; ``model.pth`` has no iteration, but the
    ``best.json`` next to ``best/model.pth`` has). The backbone runs on ``engine`` (default:
    the file's)."""
    path = Path(path)
    state = load_tagged(path, [SEG_MODEL_FORMAT, SEG_CHECKPOINT_FORMAT],
                        "a fine-tuned segmentation model", missing="; pass a fine-tuned "
                        "model.pth or a checkpoint_<it>.pth of segmentation fine-tuning to "
                        "evaluate_only=", expected=f"a segmentation model ({SEG_MODEL_FORMAT!r}, "
                        f"model.pth of fine-tuning) or a segmentation checkpoint "
                        f"({SEG_CHECKPOINT_FORMAT!r})")
    if state["format"] == SEG_MODEL_FORMAT:
        best = path.parent / "best.json"
        meta = {k: state[k] for k in ("classes", "voxel_size", "features")}
        meta["iterations"] = json.loads(best.read_text())["iteration"] if best.is_file() else None
    else:
        data = state.get("config", {}).get("data", {})
        meta = {"classes": None, "voxel_size": data.get("voxel_size"),
                "features": data.get("features"), "iterations": state["state"]["iteration"]}
    return segmentation_model_from_state(state, engine), meta


def check_fine_tuned(path: str, meta: dict, num_classes: int, eval_set, cfg: SegDataConfig
                     ) -> None:
    """The model in ``path`` must have been fine-tuned on what ``eval_set`` gives it: the same
    classes (in order), voxel size and input features; each difference is an error that says
    which setting to change."""
    classes = eval_set.classes
    if num_classes != len(classes) or meta["classes"] not in (None, classes):
        has = meta["classes"] if meta["classes"] is not None else f"{num_classes} classes"
        raise ValueError(f"evaluate_only={path} predicts {has} but {cfg.root} has {classes}; "
                         f"evaluate it on the benchmark it was fine-tuned on (data.root=...)")
    size = meta["voxel_size"]
    if size is not None and not math.isclose(size, eval_set.voxel_size, rel_tol=1e-6):
        raise ValueError(f"evaluate_only={path} was fine-tuned on {size:g} m voxels but the data "
                         f"config gives {eval_set.voxel_size:g} m (data.voxel_size="
                         f"{'null' if cfg.voxel_size is None else cfg.voxel_size}; null: the "
                         f"manifest's); set data.voxel_size={size:g}")
    if meta["features"] is not None and meta["features"] != cfg.features:
        raise ValueError(f"evaluate_only={path} was fine-tuned on {meta['features']!r} features "
                         f"but data.features={cfg.features!r}; set "
                         f"data.features={meta['features']}")


def final_evaluation(model: nn.Module, eval_set, cfg: FinetuneSegConfig, out_dir: Path,
                     device, extra: dict, print_fn=print) -> dict:
    """Evaluate ``model`` on every scene of ``eval_set`` (original points, ``eval.rotations``),
    write ``results.md`` / ``results.json`` (with ``extra``), then the exports:
    ``results_iou.png`` and PLY files of the first ``eval.ply_scenes`` scenes' predictions
    (so that a full disk during the exports leaves the results); returns ``results.json``'s
    numbers and ``extra``. An I/O error is an ``OutputError`` naming the file and, for an
    export, the results written before it."""
    e = cfg.eval
    kept: list = []  # the PLY scenes' predictions, written after the results
    metrics = evaluate_scenes(model, eval_set.scenes_for_eval(e.protocol), eval_set.classes,
                              eval_set.voxel_size, eval_set.features, rotations=e.rotations,
                              up_axis=eval_set.up_axis, device=device,
                              ply_scenes=e.ply_scenes, predictions=kept,
                              protocol=e.protocol, label_rule=eval_set.label_rule)
    extra = {"split": cfg.data.eval_split, "scenes": len(eval_set), **extra,
             "rotations": e.rotations, "voxel_size": eval_set.voxel_size,
             "protocol": e.protocol}
    title = f"{eval_set.manifest.get('benchmark', 'segmentation')} {cfg.data.eval_split}"
    # what to run once an I/O error is fixed: a trained run resumes (its final checkpoint is
    # there), an evaluation (evaluate_only, the kNN probe) is run again
    then = RERUN if cfg.evaluate_only or cfg.probe == "knn" else RESUME
    paths = write_results(out_dir, metrics, title=title, extra=extra, then=then)
    print_fn(f"finetune-seg: {cfg.data.eval_split} mIoU {100 * metrics.miou:.1f}, mAcc "
             f"{100 * metrics.macc:.1f}, oAcc {100 * metrics.oacc:.1f} ({len(eval_set)} scenes, "
             f"{e.rotations} rotation(s)); {out_dir / 'results.md'}")
    try:
        write_prediction_plys(out_dir / "predictions", kept, len(eval_set.classes), then)
    except OutputError as err:
        raise written_before(err, paths.values()) from None
    return {**extra, **metrics.to_dict()}


def check_evaluate_only(cfg: FinetuneSegConfig) -> None:
    """``evaluate_only`` evaluates a finished model: it needs an evaluation split and takes
    neither starting weights nor a run to continue."""
    given = [f"{k}={v}" for k, v in (("pretrained", cfg.pretrained), ("resume", cfg.resume)) if v]
    if given:
        unset = " and ".join(f"{g.split('=')[0]}=null" for g in given)
        raise ValueError(f"evaluate_only={cfg.evaluate_only} evaluates that model as it is, so "
                         f"{' and '.join(given)} cannot go with it; set {unset} (or drop "
                         "evaluate_only to train)")
    if cfg.data.eval_split is None:
        splits = ""
        if cfg.data.root not in ("???", "", None):
            filled = [k for k, v in read_seg_manifest(Path(cfg.data.root))["splits"].items() if v]
            splits = f" (splits of {cfg.data.root}: {filled})"
        raise ValueError(f"evaluate_only={cfg.evaluate_only} needs an evaluation split but "
                         f"data.eval_split is null; set data.eval_split=<split>{splits}")


def evaluate_only(cfg: FinetuneSegConfig, out_dir: Path, device, print_fn=print) -> dict:
    """Evaluate the fine-tuned model ``cfg.evaluate_only`` (no training), as the final
    evaluation of a run does; returns ``results.json``'s content."""
    path = cfg.evaluate_only
    model, meta = load_fine_tuned(path, cfg.model.engine)
    eval_set = build_seg_dataset(cfg.data, cfg.data.eval_split, train=False, seed=cfg.seed)
    if len(eval_set) == 0:
        filled = [k for k, v in eval_set.manifest["splits"].items() if v]
        raise ValueError(f"evaluation split {cfg.data.eval_split!r} is empty; choose "
                         f"data.eval_split from {filled}")
    check_fine_tuned(path, meta, model.num_classes, eval_set, cfg.data)
    width = model.backbone.config()["in_channels"]
    if width != eval_set.in_channels:  # e.g. a 1-channel 'ones' model from before 'ones1'
        raise ValueError(f"evaluate_only={path} takes {width}-channel input but data.features="
                         f"{cfg.data.features!r} gives {eval_set.in_channels} channels; every "
                         f"constant mode but ones1 has 3 channels: set data.features=ones1")
    name = model.backbone.config()["name"]
    print_fn(f"finetune-seg: evaluating {path} ({name} on {cfg.model.engine}, "
             f"{meta['iterations'] if meta['iterations'] is not None else 'unknown'} iterations) "
             f"on {len(eval_set)} {cfg.data.eval_split} scenes, voxel "
             f"{eval_set.voxel_size:g} m, device {device}, out {out_dir}")
    return final_evaluation(model.to(device), eval_set, cfg, out_dir, device,
                            {"evaluated": str(path), "iterations": meta["iterations"],
                             "model": name}, print_fn)
