"""Pretraining's config values, checked before anything is written
(:mod:`mink_ssl.engine.validate`); the schema itself is
:class:`mink_ssl.tasks.pretrain.PretrainConfig`."""
from __future__ import annotations

from mink_ssl.engine.build import import_plugins
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

    if not isinstance(cfg.imports, (list, tuple)) or not all(
            isinstance(m, str) for m in cfg.imports):
        c.fail("imports", cfg.imports, "must be a list of module names")
    else:  # objectives of your own register on import: their arguments are checked below too
        try:
            import_plugins(list(cfg.imports))
        except ValueError as e:
            c.fail("imports", cfg.imports, str(e).removeprefix("imports: "))
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
            check_objective_arguments(c, name, {k: v for k, v in args.items() if k != "weight"})
    c.raise_if_any("pretraining config")
    return notes


def check_objective_arguments(c: Checks, name: str, args: dict) -> None:
    """``objectives.<name>``'s arguments (``weight`` apart) against the objective's arguments
    dataclass (:mod:`mink_ssl.objectives.defaults`): every key one of its fields, every value of
    the field's type and in its range. A plug-in objective without a dataclass is checked against
    one derived from its constructor (names and annotated types); one not registered (its
    module failed to import, reported under ``imports``) for finite numbers only."""
    from mink_ssl.objectives import OBJECTIVES
    from mink_ssl.objectives.args import argument_problems, args_class

    if name not in OBJECTIVES:
        check_finite_tree(c, f"objectives.{name}", args)
        return
    for key, value, rule, fix in argument_problems(args_class(OBJECTIVES.get(name)), args,
                                                   f"objectives.{name}"):
        c.fail(key, value, rule, fix)


def register_objective_configs() -> None:
    """Store each built-in objective's defaults (``weight`` and the fields of its arguments
    dataclass, :mod:`mink_ssl.objectives.defaults`) in Hydra's ConfigStore as
    ``objective_args/<name>``. The objective configs extend them (``configs/objective/*.yaml``:
    ``- /objective_args/<name>@_here_``) and hold only what a recipe changes, so that every
    argument is a key of the composed config: ``objectives.<name>.<argument>=`` overrides it
    without a ``+``. Objectives of your own (``imports``) keep ``+objectives.<name>...``."""
    try:
        from hydra.core.config_store import ConfigStore
    except ImportError:  # the library without Hydra: nothing composes configs
        return
    from mink_ssl.objectives import OBJECTIVES
    from mink_ssl.objectives.args import declared_defaults

    store = ConfigStore.instance()
    for name in OBJECTIVES.names():
        if getattr(OBJECTIVES.get(name), "Args", None) is not None:
            store.store(group="objective_args", name=name,
                        node=declared_defaults(OBJECTIVES.get(name)))


# before any pretraining config is composed: the CLI and the tests import this module (through
# mink_ssl.tasks.pretrain) when they register the pretraining schema
register_objective_configs()
