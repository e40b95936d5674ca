"""Objectives' arguments as typed dataclasses: their defaults are written once, there
(:mod:`mink_ssl.objectives.defaults`).

    @dataclass
    class MyArgs:
        max_matches: int = arg(4096, "matches used per step", minimum=1)

    @OBJECTIVES.register("my_objective")
    @objective_args(MyArgs)
    class MyObjective(Objective):
        def __init__(self, args: MyArgs): ...        # reads args.max_matches

    MyObjective(max_matches=128)                     # keywords: the dataclass's fields
    MyObjective.Args                                 # MyArgs

What :func:`objective_args` gives: a constructor taking the fields as keywords (its signature
is the dataclass's, so ``build_objectives`` and the docs read the defaults from it), an error
for an unknown keyword or a value of the wrong type or out of the field's range (the same rules
the config checks apply), and the class attribute ``Args``. The
config checks (:func:`argument_problems`) name ``objectives.<name>.<key>``, the value and the
type or range the field's :func:`arg` declares. An objective without a dataclass (a plug-in
registered with ``@OBJECTIVES.register`` only) keeps working: :func:`args_class` derives one
from its constructor's signature (names, annotations, defaults; no ranges).

``weight`` is not an argument of any objective: the trainer scales the objective's ``loss_*``
terms by it (:data:`DEFAULT_WEIGHT` unless the config sets ``objectives.<name>.weight``).
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from typing import Any, Optional, Union

from mink_ssl.engine.validate import number_rule

#: an objective's loss weight when the config does not set ``objectives.<name>.weight``
DEFAULT_WEIGHT = 1.0


def arg(default: Any, doc: str, *, choices: tuple | None = None, length: int | None = None,
        **bounds) -> Any:
    """A dataclass field with its default, what it means (``doc``, for the docs' tables) and
    its range: ``choices`` for strings, ``length`` for lists, and the bounds of
    :func:`mink_ssl.engine.validate.number_rule` (``minimum`` / ``maximum`` inclusive,
    ``above`` / ``below`` exclusive) for numbers and list entries. A list default is copied
    for every instance."""
    meta = {"doc": doc, "choices": choices, "length": length, "bounds": bounds}
    if isinstance(default, (list, tuple)):
        items = list(default)
        return dataclasses.field(default_factory=lambda: list(items), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def defaults(args_cls: type) -> dict[str, Any]:
    """``{field: default}`` of an arguments dataclass, in field order."""
    return {f.name: default_of(f) for f in dataclasses.fields(args_cls)}


def field_types(args_cls: type) -> dict[str, Any]:
    """The fields' annotations, resolved (``from __future__ import annotations`` makes them
    strings)."""
    return typing.get_type_hints(args_cls)


# ---------------------------------------------------------------------------- type checks

def _is_union(origin: Any) -> bool:
    """``Optional[int]`` and ``int | None`` alike."""
    return origin is Union or origin is types.UnionType

def describe_type(tp: Any) -> str:
    """``int`` -> ``an integer``, ``Optional[float]`` -> ``a number or null``, ..."""
    origin, inner = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(origin):
        rest = [t for t in inner if t is not type(None)]
        return " or ".join(describe_type(t) for t in rest) + (
            " or null" if len(rest) < len(inner) else "")
    if origin in (list, tuple):
        return f"a list of {describe_type(inner[0]).split(' ', 1)[1]}s" if inner else "a list"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, f"a {getattr(tp, '__name__', tp)}")


def type_matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` (as a config or a caller passes it) fits the annotation ``tp``: a
    float field takes an int, an int field no bool, a list field a list or tuple."""
    origin, inner = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if _is_union(origin):
        return any(type_matches(value, t) for t in inner)
    if tp is type(None):
        return value is None
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and (
            not inner or all(type_matches(v, inner[0]) for v in value))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else True


def describe_range(f: dataclasses.Field) -> str:
    """The range a field's :func:`arg` declares, as the docs and errors write it."""
    meta = f.metadata or {}
    parts = []
    if meta.get("choices"):
        parts.append(" | ".join(map(str, meta["choices"])))
    if meta.get("length"):
        parts.append(f"{meta['length']} entries")
    symbols = {"minimum": ">=", "above": ">", "maximum": "<=", "below": "<"}
    bounds = [f"{symbols[k]} {v:g}" for k, v in (meta.get("bounds") or {}).items()]
    if bounds:
        parts.append(" and ".join(bounds))
    return ", ".join(parts)


def value_problem(f: dataclasses.Field, tp: Any, value: Any) -> str | None:
    """What is wrong with ``value`` for field ``f`` of type ``tp``, or None."""
    expected = describe_type(tp)
    if not type_matches(value, tp):
        rng = describe_range(f)
        return f"must be {expected}" + (f" ({rng})" if rng else "")
    if value is None:
        return None
    meta = f.metadata or {}
    if meta.get("choices") and value not in meta["choices"]:
        return f"must be one of {', '.join(map(str, meta['choices']))}"
    is_list = isinstance(value, (list, tuple))
    if meta.get("length") and is_list and len(value) != meta["length"]:
        return f"must be {expected} with {meta['length']} entries"
    integer = _scalar_type(tp) is int
    for v in (value if is_list else [value]):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            broken = number_rule(v, integer=integer, **(meta.get("bounds") or {}))
            if broken:
                return (f"must be a list with every entry {broken.split('must be ', 1)[1]}"
                        if is_list else broken + (" or null" if "null" in expected else ""))
    return None


def _scalar_type(tp: Any) -> Any:
    """``Optional[List[int]]`` -> ``int``: the type of the numbers a field holds."""
    while _is_union(typing.get_origin(tp)) or typing.get_origin(tp) in (list, tuple):
        inner = [t for t in typing.get_args(tp) if t is not type(None)]
        if not inner:
            return Any
        tp = inner[0]
    return tp


def argument_problems(args_cls: type, args: dict, prefix: str) -> list[tuple[str, Any, str, str]]:
    """``(key, value, rule, fix)`` for every unknown key and every value of the wrong type or
    out of range in ``args`` (an objective's arguments from a config, without ``weight``);
    keys are written ``<prefix>.<field>``."""
    fields = {f.name: f for f in dataclasses.fields(args_cls)}
    types = field_types(args_cls)
    found = []
    for key, value in args.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            found.append((f"{prefix}.{key}", value, "is not an argument of this objective",
                          (f"did you mean {prefix}.{close[0]}? " if close else "")
                          + f"valid: weight, {', '.join(fields)}"))
            continue
        rule = value_problem(fields[key], types.get(key, Any), value)
        if rule:
            default = default_of(fields[key])
            example = ("" if default is dataclasses.MISSING else f", e.g. {prefix}.{key}="
                       f"{'null' if default is None else default} (the default)")
            found.append((f"{prefix}.{key}", value, rule, f"pass {prefix}.{key}=<value>{example}"))
    return found


# ---------------------------------------------------------------------------- constructors

def objective_args(args_cls: type):
    """Class decorator: the objective's ``__init__(self, args)`` gets a constructor taking
    ``args_cls``'s fields as keywords (defaults from the dataclass, types and ranges checked:
    ``ValueError`` naming each bad keyword, its value and the rule); the class
    gets ``Args = args_cls``."""
    if not dataclasses.is_dataclass(args_cls):
        raise TypeError(f"objective_args needs a dataclass, got {args_cls!r}")

    def decorate(cls: type) -> type:
        build = cls.__init__
        fields = {f.name: f for f in dataclasses.fields(args_cls)}
        types = field_types(args_cls)

        def __init__(self, **kwargs):
            unknown = sorted(set(kwargs) - set(fields))
            if unknown:
                raise TypeError(f"{cls.__name__} has no argument(s) {unknown}; valid: "
                                f"{list(fields)}")
            problems = [f"{key} {rule}, got {value!r}" for key, value in kwargs.items()
                        if (rule := value_problem(fields[key], types[key], value))]
            if problems:
                raise ValueError(f"{cls.__name__}: " + "; ".join(problems))
            build(self, args_cls(**kwargs))

        params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)] + [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default_of(f),
                              annotation=types[name]) for name, f in fields.items()]
        __init__.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        __init__.__doc__ = build.__doc__
        __init__.__qualname__ = f"{cls.__qualname__}.__init__"
        cls.__init__ = __init__
        cls.Args = args_cls
        return cls

    return decorate


def args_class(objective_cls: type) -> type:
    """The arguments dataclass of a registered objective: its ``Args``, or one derived from its
    constructor's signature (a plug-in without a dataclass: names, annotations where they are
    types, defaults; a parameter without a default gets none)."""
    declared = getattr(objective_cls, "Args", None)
    if declared is not None and dataclasses.is_dataclass(declared):
        return declared
    try:
        hints = typing.get_type_hints(objective_cls.__init__)
    except Exception:  # an annotation that does not resolve: check names only
        hints = {}
    spec = []
    for p in inspect.signature(objective_cls.__init__).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        tp = hints.get(p.name, Any)
        if p.default is inspect.Parameter.empty:
            spec.append((p.name, tp))
        else:
            default = p.default
            spec.append((p.name, tp, dataclasses.field(
                default_factory=lambda d=default: d) if isinstance(default, (list, dict))
                else dataclasses.field(default=default)))
    spec.sort(key=lambda s: len(s) == 3)  # fields without defaults first
    return dataclasses.make_dataclass(f"{objective_cls.__name__}Args", spec)


def declared_defaults(objective_cls: type) -> dict[str, Any]:
    """``{"weight": DEFAULT_WEIGHT, field: default, ...}``: what a config of the objective
    holds before a recipe changes anything (fields without a default are left out)."""
    found = {"weight": DEFAULT_WEIGHT}
    for f in dataclasses.fields(args_class(objective_cls)):
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            found[f.name] = default_of(f)
    return found


def resolve_in_channels(objective_cls: type, args: dict, feature_channels: Optional[int]) -> dict:
    """The one rule for an objective's ``in_channels``: the config's value when it sets one,
    else the backbone's output width (``feature_channels``, ``model.out_channels``); objectives
    without ``in_channels`` are left as they are. Returns a new dict."""
    args = dict(args)
    names = [f.name for f in dataclasses.fields(args_class(objective_cls))]
    if "in_channels" in names and args.get("in_channels") is None and feature_channels:
        args["in_channels"] = feature_channels
    return args
