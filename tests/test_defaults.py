"""Defaults live in one place: the typed config dataclasses (mink_ssl/engine/config.py, the
tasks' configs, mink_ssl/objectives/defaults.py). A YAML file under configs/ holds only what its
recipe changes; objectives' arguments are typed and checked. (The docs' tables of defaults
against the code: tests/test_defaults_docs.py.)"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from helpers import compose_config
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

#: Hydra's own plug-in settings (the submitit launcher's keys): no dataclass of ours holds them
NOT_OURS = ("hydra/",)

# ------------------------------------------------------------------------- the YAML files

def package_of(path: Path) -> str:
    """Where a config file's keys land: its ``# @package`` header, else its group's path
    (Hydra's default); ``""`` is the root."""
    for line in path.read_text().splitlines():
        m = re.match(r"#\s*@package\s+(\S+)", line)
        if m:
            return "" if m.group(1) == "_global_" else m.group(1)
        if line.strip() and not line.startswith("#"):
            break
    group = path.parent.relative_to(CONFIGS).as_posix()
    return "" if group == "." else group.replace("/", ".")


def leaves(tree, prefix: str = ""):
    """``(dotted key, value)`` for every leaf of a YAML mapping (lists are leaves)."""
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from leaves(value, full + ".")  # an empty mapping sets nothing
        else:
            yield full, value


def commands() -> dict[str, dict]:
    return _commands(CONFIGS)


@functools.lru_cache(maxsize=None)
def _commands(configs: Path) -> dict[str, dict]:
    """Each command's root config (``configs/<name>.yaml``): its schema (the ``*_schema`` entry
    of its defaults list, a dataclass stored by the command's CLI), the config groups it
    composes, and those composed after its own values (``_self_``)."""
    from hydra.core.config_store import ConfigStore

    compose_config("pretrain", "data.root=/x")  # registers every command's schema
    found = {}
    for root in sorted(configs.glob("*.yaml")):
        entries = OmegaConf.to_container(OmegaConf.load(root)).get("defaults", [])
        names = [e for e in entries if isinstance(e, str)]
        schema_name = next(n for n in names if n.endswith("_schema"))
        node = ConfigStore.instance().load(f"{schema_name}.yaml").node
        groups, after_self, seen_self = set(), set(), False
        for e in entries:
            if e == "_self_":
                seen_self = True
            elif isinstance(e, dict):
                group = next(iter(e)).replace("override ", "").strip("/")
                groups.add(group)
                if seen_self:
                    after_self.add(group)
        found[root.stem] = {"schema": OmegaConf.get_type(node)(), "groups": groups,
                            "after_self": after_self, "file": root}
    return found


def schemas_for(path: Path) -> list[tuple[str, object, dict]]:
    """``(command, schema instance, values composed before this file)`` of every command
    that composes ``path``; the values before are the command's own file's when ``path`` is a
    group option composed after it (a recipe changes those, and the schema's elsewhere)."""
    rel = path.relative_to(CONFIGS).as_posix()
    out = []
    for name, cmd in commands().items():
        group = rel.rsplit("/", 1)[0] if "/" in rel else None
        if group is None and rel != f"{name}.yaml" or group and group not in cmd["groups"]:
            continue
        before = {}
        if group in cmd["after_self"]:
            tree = OmegaConf.to_container(OmegaConf.load(cmd["file"]), resolve=False)
            tree.pop("defaults", None)
            before = dict(leaves(tree))
        out.append((name, cmd["schema"], before))
    return out


def default_at(schema, key: str):
    """The schema's default for a dotted key; ``KeyError`` if the schema has no such key. An
    objective's arguments (``objectives.<name>.<arg>``) are its arguments dataclass's."""
    from mink_ssl.objectives import OBJECTIVES
    from mink_ssl.objectives.args import declared_defaults

    parts = key.split(".")
    if parts[0] == "objectives" and len(parts) >= 3:
        found = declared_defaults(OBJECTIVES.get(parts[1]))
        node = found
        for part in parts[2:]:
            node = node[part]
        return node
    node = schema
    for part in parts:
        if dataclasses.is_dataclass(node):
            if part not in {f.name for f in dataclasses.fields(node)}:
                raise KeyError(key)
            node = getattr(node, part)
        elif isinstance(node, dict):
            node = node[part]
        else:
            raise KeyError(key)
    return node


def same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def drifted(a, b) -> bool:
    """A rounded copy of the default: equal to 6 significant digits, not equal."""
    if isinstance(a, bool) or isinstance(b, bool):
        return False
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a != b and math.isclose(a, b, rel_tol=1e-6)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return not same(a, b) and all(same(x, y) or drifted(x, y) for x, y in zip(a, b))
    return False


def yaml_values_against_defaults(path: Path) -> tuple[list[str], list[str]]:
    """``(repeats, problems)`` of one config file: the keys whose value is the default (for
    every command composing it), and the keys that contradict it (a rounded copy) or that no
    schema holds."""
    tree = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    tree.pop("defaults", None)  # the defaults list: which configs compose, no values
    package = package_of(path)
    if package:
        for part in reversed(package.split(".")):
            tree = {part: tree}
    repeats, problems = [], []
    commands_of = schemas_for(path)
    for key, value in leaves(tree):
        if key in ("defaults", "hydra") or key.startswith(("defaults.", "hydra.")):
            continue
        if isinstance(value, str) and "${" in value:
            problems.append(f"{key}: {value} (an interpolation: the code resolves it)")
            continue
        hits = []
        if not commands_of:
            problems.append(f"{key}: no command composes {path.name} by default")
        for command, schema, before in commands_of:
            try:
                default = default_at(schema, key)
            except KeyError:
                problems.append(f"{key}: no such key in the {command} schema")
                continue
            default = before.get(key, default)
            if drifted(value, default):
                problems.append(f"{key}={value!r} contradicts the default {default!r} "
                                f"({command})")
            hits.append(same(value, default) or (value == "???" and default == "???"))
        if hits and all(hits):
            repeats.append(key)
    return repeats, problems


YAMLS = sorted(p for p in CONFIGS.rglob("*.yaml")
               if not p.relative_to(CONFIGS).as_posix().startswith(NOT_OURS))


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_config_files_hold_only_what_their_recipe_changes(path):
    rel = path.relative_to(CONFIGS).as_posix()
    repeats, problems = yaml_values_against_defaults(path)
    assert problems == [], f"{rel}: {problems}"
    assert repeats == [], (f"{rel} repeats the default of {sorted(repeats)}: delete those lines "
                           "(the dataclass holds the default)")


def test_the_check_sees_a_repeat_a_rounded_copy_and_an_unknown_key(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "CONFIGS", tmp_path)
    (tmp_path / "pretrain.yaml").write_text((REPO / "configs" / "pretrain.yaml").read_text())
    (tmp_path / "objective").mkdir()
    bad = tmp_path / "objective" / "perturbation.yaml"
    bad.write_text("# @package objectives.perturbation\nalpha_cls: 1.1111111\nview: 0\n"
                   "patch_size: 30\nnoise_sdt: 2.0\n")
    repeats, problems = yaml_values_against_defaults(bad)
    assert repeats == ["objectives.perturbation.view"]
    assert problems == [
        "objectives.perturbation.alpha_cls=1.1111111 contradicts the default "
        "1.1111111111111112 (pretrain)",
        "objectives.perturbation.noise_sdt: no such key in the pretrain schema"]
    (tmp_path / "optim").mkdir()
    sgd = tmp_path / "optim" / "sgd.yaml"
    sgd.write_text("lr: 0.1\nlr_step: 500\n")
    assert yaml_values_against_defaults(sgd) == (["optim.lr"], [])


# --------------------------------------------------------------- objectives' arguments

def registered_with_args():
    from mink_ssl.objectives import OBJECTIVES

    return [n for n in OBJECTIVES.names() if getattr(OBJECTIVES.get(n), "Args", None)]


#: what each objective config changes against the defaults (the recipes); every other
#: argument of the composed config must be its dataclass default
RECIPES = {
    "cluster_render": {"data.frame_size": [60, 80]},
    "nce_gmm": {"objectives.gmm_likelihood.weight": 0.1},
    "nce_perturbation": {"objectives.perturbation.weight": 0.5},
}


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONFIGS / "objective").glob("*.yaml")))
def test_each_objective_config_composes_to_the_defaults_plus_its_recipe(option):
    """The composed config holds every argument of each selected objective as a key (so
    ``objectives.<name>.<arg>=`` needs no ``+``) with the dataclass default, except what the
    recipe changes; the run resolves them to the constructor's arguments unchanged."""
    from mink_ssl.objectives import OBJECTIVES
    from mink_ssl.objectives.args import declared_defaults
    from mink_ssl.tasks.pretrain import build_objectives

    cfg = OmegaConf.to_object(compose_config("pretrain", "data.root=/x", f"objective={option}"))
    changes = dict(RECIPES.get(option, {}))
    assert cfg.data.frame_size == changes.pop("data.frame_size", None)
    for name, spec in cfg.objectives.items():
        expected = declared_defaults(OBJECTIVES.get(name))
        for key in list(changes):
            if key.startswith(f"objectives.{name}."):
                expected[key.rsplit(".", 1)[1]] = changes.pop(key)
        assert spec == expected, name
    assert changes == {}, f"not in the composed config: {changes}"
    objectives, weights = build_objectives(cfg.objectives, cfg.model.out_channels)
    for name, objective in objectives.items():
        if "in_channels" in cfg.objectives[name]:
            widths = {m.in_features for m in objective.modules() if hasattr(m, "in_features")}
            assert cfg.model.out_channels in widths, name


def test_an_argument_without_a_plus_overrides_and_a_typo_is_refused():
    cfg = compose_config("pretrain", "data.root=/x", "objectives.hardest_contrastive.seed=3",
                         "objectives.hardest_contrastive.pos_weight=2.0")
    assert cfg.objectives.hardest_contrastive.seed == 3
    assert cfg.objectives.hardest_contrastive.pos_weight == 2.0
    with pytest.raises(Exception, match="num_pos_per_pari"):
        compose_config("pretrain", "data.root=/x", "objectives.hardest_contrastive.num_pos_per_pari=1")


def test_config_check_names_the_key_the_value_and_the_expected_type_or_range():
    from mink_ssl.engine.validate import ConfigError
    from mink_ssl.tasks.pretrain import DataConfig, PretrainConfig
    from mink_ssl.tasks.pretrain_config import check_pretrain_config

    cfg = PretrainConfig(data=DataConfig(root="/x"), objectives={
        "point_info_nce": {"temperature": "hot", "num_matchs": 3},
        "perturbation": {"view": 2, "reconstruction": "l2", "in_channels": 32},
        "distillation": {"local_crop_scale": [0.2, 1.5], "seed": 1.5}})
    with pytest.raises(ConfigError) as err:
        check_pretrain_config(cfg)
    text = str(err.value)
    for line in [
            "objectives.point_info_nce.temperature=hot: must be a number (> 0); pass "
            "objectives.point_info_nce.temperature=<value>, e.g. "
            "objectives.point_info_nce.temperature=0.4 (the default)",
            "objectives.point_info_nce.num_matchs=3: is not an argument of this objective; did "
            "you mean objectives.point_info_nce.num_matches?",
            "objectives.perturbation.view=2: must be an integer >= 0 and <= 1",
            "objectives.perturbation.reconstruction=l2: must be one of delta, chamfer",
            "objectives.distillation.local_crop_scale=[0.2, 1.5]: must be a list with every "
            "entry a number > 0 and <= 1",
            "objectives.distillation.seed=1.5: must be an integer or null"]:
        assert line in text
    assert "in_channels" not in text
    assert len(text.splitlines()) == 1 + 6


@pytest.mark.parametrize("name", registered_with_args())
def test_the_constructor_is_the_dataclass(name):
    """The signature ``build_objectives`` reads is the dataclass's fields and defaults; the
    constructor refuses what the config check refuses."""
    from mink_ssl.objectives import OBJECTIVES
    from mink_ssl.objectives.args import default_of

    cls = OBJECTIVES.get(name)
    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    fields = dataclasses.fields(cls.Args)
    assert [(p.name, p.default) for p in params] == [(f.name, default_of(f)) for f in fields]
    with pytest.raises(TypeError, match="no argument"):
        cls(not_an_argument=1)
    for f in fields:
        bounds = f.metadata.get("bounds") or {}
        if f.metadata.get("choices"):
            bad = "no such choice"
        elif "minimum" in bounds:
            bad = bounds["minimum"] - 1
        elif "above" in bounds:
            bad = bounds["above"]
        else:
            continue
        if isinstance(default_of(f), list):
            bad = [bad] * len(default_of(f))
        with pytest.raises(ValueError, match=rf"{f.name} must be"):
            cls(**{f.name: bad})


@pytest.mark.parametrize("name", registered_with_args())
def test_in_channels_follows_one_rule(name):
    """``in_channels``: the config's value when set, else the backbone's width; what
    resolve_in_channels says is what build_objectives builds."""
    from mink_ssl.objectives import OBJECTIVES
    from mink_ssl.objectives.args import resolve_in_channels
    from mink_ssl.tasks.pretrain import build_objectives

    cls = OBJECTIVES.get(name)
    for given in ({}, {"in_channels": None}, {"in_channels": 12}):
        resolved = resolve_in_channels(cls, given, 24)
        if "in_channels" not in {f.name for f in dataclasses.fields(cls.Args)}:
            assert resolved == given
            continue
        assert resolved["in_channels"] == (given.get("in_channels") or 24)
        built = build_objectives({name: dict(given)}, 24)[0][name]
        widths = {m.in_features for m in built.modules() if isinstance(m, torch.nn.Linear)}
        if name == "distillation":  # its projector is built with the width
            widths = {built.in_channels}
        assert resolved["in_channels"] in widths, (given, widths)


def test_a_plug_in_without_a_dataclass_gets_one_from_its_signature():
    from mink_ssl.objectives import Objective
    from mink_ssl.objectives.args import args_class, argument_problems, declared_defaults

    class MatchedCosine(Objective):
        def __init__(self, max_matches: int = 4096, scale: float = 1.0, cap: int | None = None):
            super().__init__()

    assert declared_defaults(MatchedCosine) == {"weight": 1.0, "max_matches": 4096, "scale": 1.0,
                                                "cap": None}
    problems = argument_problems(args_class(MatchedCosine),
                                 {"max_matches": "many", "scael": 2, "cap": 1.5, "scale": 3},
                                 "objectives.matched_cosine")
    assert [(k, rule) for k, _, rule, _ in problems] == [
        ("objectives.matched_cosine.max_matches", "must be an integer"),
        ("objectives.matched_cosine.scael", "is not an argument of this objective"),
        ("objectives.matched_cosine.cap", "must be an integer or null")]
