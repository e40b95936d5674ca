"""Pretraining's config values, checked before anything is written
(:mod:`mink_ssl.engine.validate`); the schema itself is
:class:`mink_ssl.tasks.pretrain.PretrainConfig`."""
from __future__ import annotations

from mink_ssl.engine.validate import (Checks, check_finite_tree, check_optimizer,
                                      check_run_config, check_workers)

UNSET = ("???", "", None)


def check_pretrain_config(cfg) -> list[str]:
    """Every value of a :class:`~mink_ssl.tasks.pretrain.PretrainConfig` finite and in range;
    a :class:`~mink_ssl.engine.validate.ConfigError` names each key that is not. Returns notes
    for values that run but deserve a word."""
    from mink_ssl.data.features import FEATURE_MODES

    c = Checks(cfg)
    notes = check_run_config(c)
    check_optimizer(c, ("sgd", "adam", "adamw"))
    c.number("optim.dampening", minimum=0, below=1)
    c.choice("optim.schedule", ("step", "cosine"))
    c.number("optim.lr_step", integer=True, minimum=1, what="iterations")
    c.number("optim.lr_gamma", above=0)
    c.number("optim.warmup_iterations", integer=True, minimum=0)
    c.number("max_iterations", integer=True, minimum=1,
             what="0 would export an untrained backbone")
    c.number("batch_size", integer=True, minimum=1, what="pairs per process")
    warm, total = cfg.optim.warmup_iterations, cfg.max_iterations
    if isinstance(warm, int) and isinstance(total, int) and total >= 1 and warm >= total:
        c.fail("optim.warmup_iterations", warm, f"must be below max_iterations={total}")

    d = cfg.data
    if d.root in UNSET:
        c.fail("data.root", d.root, "is not set",
               "pass data.root=<output directory of mink-ssl-prep scannet>")
    c.voxel_size("data.voxel_size")
    c.number("data.rotation_deg", minimum=0, maximum=360,
             what="degrees: each view is rotated by up to this angle")
    c.choice("data.rotation_axis", ("random", "z"))
    c.numbers("data.scale", length=2, ordered=True, above=0)
    c.number("data.translation", minimum=0, what="metres")
    c.choice("data.features", sorted(FEATURE_MODES))
    c.number("data.match_radius", above=0, what="voxels")
    c.number("data.max_matches", integer=True, minimum=1, optional=True)
    c.number("data.min_matches", integer=True, minimum=1,
             what="pairs with fewer matches are skipped")
    if (isinstance(d.max_matches, int) and isinstance(d.min_matches, int)
            and d.min_matches > d.max_matches >= 1):
        c.fail("data.min_matches", d.min_matches, f"is above data.max_matches={d.max_matches}: "
               "every pair would be skipped", "lower data.min_matches or raise data.max_matches")
    c.number("data.max_depth", above=0, optional=True, what="metres")
    if d.frame_size is not None:
        c.numbers("data.frame_size", length=2, integer=True, minimum=1)
    check_workers(c)

    if not isinstance(cfg.objectives, dict):
        c.fail("objectives", cfg.objectives, "must map objective names to their arguments")
    else:
        for name, args in cfg.objectives.items():
            if args is not None and not isinstance(args, dict):
                c.fail(f"objectives.{name}", args, "must be the objective's arguments (a mapping)")
                continue
            args = args or {}
            if "weight" in args:
                sub = Checks({"objectives": {name: args}})
                sub.number(f"objectives.{name}.weight", minimum=0,
                           what="a negative weight would maximise that loss")
                c.problems += sub.problems
            check_finite_tree(c, f"objectives.{name}",
                              {k: v for k, v in args.items() if k != "weight"})
    if not isinstance(cfg.imports, (list, tuple)) or not all(
            isinstance(m, str) for m in cfg.imports):
        c.fail("imports", cfg.imports, "must be a list of module names")
    c.raise_if_any("pretraining config")
    return notes
