"""Config values checked before anything is written: every number finite and in its range, each
problem naming its key, the value and what to pass instead (the schema's default as example).

    checks = Checks(cfg)                       # a task config (a dataclass with defaults)
    checks.number("batch_size", integer=True, minimum=1)
    checks.number("optim.lr", above=0)
    checks.raise_if_any()                      # one ConfigError listing every problem

The run settings every task shares (:class:`~mink_ssl.engine.config.RunConfig`, the model) are
checked by :func:`check_run_config`; each task adds its own fields
(:mod:`mink_ssl.tasks.pretrain_config`, the tasks' ``config`` modules). The CLIs run the same
checks before Hydra creates the run directory (:mod:`mink_ssl.cli._hydra`), and the tasks'
entry points run them again before their run directory is touched, for callers of the Python
API.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

#: voxel sizes are metres (prep writes metric coordinates); outside these bounds a value is a
#: unit mistake (centimetres, millimetres) rather than a choice: below 1 mm no depth sensor
#: resolves the voxels and a room needs billions of them; from 1 m up a room is a few voxels
VOXEL_SIZE_BOUNDS = (0.001, 1.0)


class ConfigError(ValueError):
    """Config values that cannot run; the message names every key, value and fix."""


def _get(obj, key: str):
    for part in key.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Checks:
    """Problems found in one config (``cfg``: a dataclass instance whose fields have defaults)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.problems: list[str] = []
        try:
            self.defaults = type(cfg)() if dataclasses.is_dataclass(cfg) else None
        except TypeError:  # a field without default
            self.defaults = None

    def value(self, key: str):
        return _get(self.cfg, key)

    def _example(self, key: str) -> str:
        try:
            default = _get(self.defaults, key) if self.defaults is not None else None
        except (AttributeError, KeyError):
            default = None
        if default is None or default == "???":
            return ""
        return f", e.g. {key}={_plain(default)} (the default)"

    def fail(self, key: str, value, rule: str, fix: str | None = None) -> None:
        """Record that ``key``'s ``value`` breaks ``rule``; ``fix`` replaces the standard
        'pass key=<value>' advice."""
        fix = fix or f"pass {key}=<value>{self._example(key)}"
        self.problems.append(f"{key}={_plain(value)}: {rule}; {fix}")

    def number(self, key: str, *, optional: bool = False, what: str = "",
               fix: str | None = None, **bounds) -> None:
        """``key`` must be a finite number within ``bounds`` (:func:`number_rule`: ``integer``,
        ``minimum`` / ``maximum`` inclusive, ``above`` / ``below`` exclusive); ``optional``:
        null is allowed. ``what`` says what the value is, for the message."""
        value = self.value(key)
        if value is None and optional:
            return
        broken = number_rule(value, **bounds)
        if broken:
            rule = broken + (" or null" if optional else "") + (f" ({what})" if what else "")
            self.fail(key, value, rule, fix)

    def numbers(self, key: str, length: int | None = None, ordered: bool = False,
                what: str = "", **bounds) -> None:
        """``key`` is a list of numbers, each within ``bounds`` (as :meth:`number`); ``length``
        fixes its length, ``ordered`` asks for non-decreasing values ([low, high])."""
        values = self.value(key)
        if not isinstance(values, (list, tuple)) or (length is not None and len(values) != length):
            shape = f"a list of {length} numbers" if length else "a list of numbers"
            self.fail(key, values, f"must be {shape}")
            return
        broken = [(i, number_rule(v, **bounds)) for i, v in enumerate(values)]
        broken = [(i, rule) for i, rule in broken if rule]
        for i, rule in broken:
            self.fail(f"{key}[{i}]", values[i], rule + (f" ({what})" if what else ""),
                      f"pass {key}=[...] with every entry in range")
        if ordered and not broken and list(values) != sorted(values):
            self.fail(key, values, "must be [low, high] with low <= high")

    def choice(self, key: str, choices: Iterable, optional: bool = False) -> None:
        value = self.value(key)
        choices = list(choices)
        if (value is None and optional) or value in choices:
            return
        self.fail(key, value, f"must be one of {', '.join(map(str, choices))}"
                  + (" or null" if optional else ""), f"pass {key}=<one of them>")

    def voxel_size(self, key: str, optional: bool = False) -> None:
        """Metres, within :data:`VOXEL_SIZE_BOUNDS` (a value outside is a unit mistake)."""
        low, high = VOXEL_SIZE_BOUNDS
        value = self.value(key)
        if value is None and optional:
            return
        if number_rule(value, above=0):
            self.number(key, above=0, optional=optional, what="metres")
        elif not low <= value < high:
            size = f"{value * 100:g} cm" if value >= 0.01 else f"{value * 1000:g} mm"
            why = ("a room would be a few voxels wide" if value >= high else
                   "no depth sensor resolves that, and a room would need billions of voxels")
            self.fail(key, value, f"a {size} voxel is outside the plausible {low * 1000:g} mm to "
                      f"{high:g} m: voxel sizes are metres (as the prepared coordinates), and "
                      f"{why}", f"pass {key} in metres{self._example(key)}; 0.02 - 0.1 are usual")

    def raise_if_any(self, what: str = "config") -> None:
        if not self.problems:
            return
        if len(self.problems) == 1:
            raise ConfigError(f"invalid {what} value {self.problems[0]} (nothing was written)")
        raise ConfigError(f"invalid {what} values (nothing was written):\n  "
                          + "\n  ".join(self.problems))


def number_rule(value, *, integer: bool = False, minimum: float | None = None,
                maximum: float | None = None, above: float | None = None,
                below: float | None = None) -> str | None:
    """None if ``value`` is a finite number (an integer with ``integer``) within the bounds,
    else the rule it breaks, e.g. ``"must be an integer >= 1"``."""
    bounds = [f"{op} {_plain(b)}" for op, b in ((">=", minimum), (">", above), ("<=", maximum),
                                                ("<", below)) if b is not None]
    rule = f"must be {'an integer' if integer else 'a number'}" + (
        " " + " and ".join(bounds) if bounds else "")
    if not _is_number(value) or (integer and not float(value).is_integer()):
        return rule
    if not math.isfinite(value):
        return f"not a finite number: {rule}"
    if ((minimum is not None and value < minimum) or (above is not None and value <= above)
            or (maximum is not None and value > maximum) or (below is not None and value >= below)):
        return rule
    return None


def _plain(value) -> str:
    """How a value is written on the command line: ``nan``, ``0.1``, ``auto``, ``[1, 2]``."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # nan, inf, -inf (as Hydra reads them)
    return repr(value)


def check_finite_tree(checks: Checks, key: str, tree: Any) -> None:
    """Every number in a free-form dict / list (e.g. objectives' arguments) must be finite."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            check_finite_tree(checks, f"{key}.{k}", v)
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            check_finite_tree(checks, f"{key}[{i}]", v)
    elif _is_number(tree) and not math.isfinite(tree):
        checks.fail(key, tree, "not a finite number", f"pass {key}=<a finite number>")


def check_run_config(checks: Checks) -> list[str]:
    """The run settings (:class:`~mink_ssl.engine.config.RunConfig`) and the model; returns
    notes to print for values that run but deserve a word (e.g. no periodic checkpoints)."""
    from mink_ssl.models.engines import ENGINES

    cfg = checks.cfg
    checks.number("seed", integer=True, minimum=0, below=2**32,
                  what="it seeds torch, numpy and the samplers")
    checks.number("checkpoint_every", integer=True, minimum=0, what="0: no periodic checkpoints")
    checks.number("log_every", integer=True, minimum=0, what="0: no metrics logged")
    checks.choice("distributed.backend", ("auto", "nccl", "gloo"))
    device = cfg.device
    if not (isinstance(device, str) and (device in ("auto", "cpu", "cuda")
                                         or (device.startswith("cuda:")
                                             and device[5:].isdigit()))):
        checks.fail("device", device, "must be auto, cpu, cuda or cuda:<index>")
    resume = cfg.resume
    if resume is not None and not (isinstance(resume, str) and resume):
        checks.fail("resume", resume, "must be auto, a checkpoint path or null")
    checks.number("model.out_channels", integer=True, minimum=1)
    checks.number("model.stem_kernel_size", integer=True, minimum=1)
    checks.number("model.bn_momentum", minimum=0, maximum=1)
    checks.number("model.block_bn_momentum", minimum=0, maximum=1, optional=True)
    checks.choice("model.init", ("me", "kaiming"))
    checks.choice("model.engine", ENGINES)
    notes = []
    if _is_number(cfg.checkpoint_every) and cfg.checkpoint_every == 0:
        notes.append("note: checkpoint_every=0: no periodic checkpoints; only a run stopped by "
                     "a signal and the finished run write one, so a crash loses every step (set "
                     "checkpoint_every=<n> to keep progress)")
    if _is_number(cfg.log_every) and cfg.log_every == 0:
        notes.append("note: log_every=0: no metrics are logged (metrics.jsonl, TensorBoard); "
                     "set log_every=<n> to follow the loss")
    return notes


def check_optimizer(checks: Checks, names: Iterable[str], momentum: bool = True) -> None:
    """The fields every task's ``optim`` shares: the optimizer's name, lr, weight decay and
    momentum."""
    checks.choice("optim.name", names)
    checks.number("optim.lr", above=0, what="the learning rate")
    checks.number("optim.weight_decay", minimum=0)
    if momentum:
        checks.number("optim.momentum", minimum=0, below=1)


def check_workers(checks: Checks, key: str = "data.num_workers") -> None:
    value = checks.value(key)
    if value != "auto" and not (_is_number(value) and float(value).is_integer() and value >= 0):
        checks.fail(key, value, "must be auto or an integer >= 0 (loader processes per rank)")
