"""One key selects the benchmark recipe of every fine-tuning command (#27): ``recipe=<name>``
composes the same config as the group's older name (``finetune=`` for segmentation,
``detection=`` for detection), an unknown recipe lists the command's own recipes, and selecting
it twice is refused. The configs are composed by the real commands (``--cfg job``: Hydra prints
the composed config and runs nothing)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from mink_ssl.cli._hydra import add_overrides, recipe_overrides


def compose(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"mink_ssl.cli.{module}", *args,
                           "data.root=/nonexistent", "--cfg", "job"],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module,group,name,other", [
    ("finetune_seg", "finetune", "synthia", "s3dis"),
    ("finetune_det", "detection", "sunrgbd", "scannet"),
])
def test_recipe_selects_the_same_config_as_the_group_name(module, group, name, other):
    new = compose(module, f"recipe={name}")
    old = compose(module, f"{group}={name}")
    assert new.returncode == 0, new.stderr
    assert new.stdout == old.stdout
    # and the recipe matters: another one composes another config
    assert compose(module, f"recipe={other}").stdout != new.stdout


@pytest.mark.parametrize("module,listed", [("finetune_seg", "s3dis, scannet, synthia"),
                                           ("finetune_det", "scannet, sunrgbd")])
def test_an_unknown_recipe_lists_the_commands_own(module, listed):
    r = compose(module, "recipe=nosuch")
    assert r.returncode == 2
    assert f"unknown recipe 'nosuch'; available: {listed}" in r.stderr


def test_the_recipe_selected_twice_is_refused():
    r = compose("finetune_det", "recipe=scannet", "detection=sunrgbd")
    assert r.returncode == 2
    assert "the recipe is selected twice (recipe=scannet, detection=sunrgbd)" in r.stderr


def test_recipe_overrides_keeps_prefixes_and_other_keys():
    assert recipe_overrides(["+recipe=a", "recipe_x=1", "lr=2"], "finetune") == [
        "+finetune=a", "recipe_x=1", "lr=2"]


def test_our_overrides_go_next_to_the_users():
    argv = ["prog", "a=1", "b=2", "--cfg", "job"]
    add_overrides(argv, "c=3")
    assert argv == ["prog", "a=1", "b=2", "c=3", "--cfg", "job"]
    argv = ["prog", "--cfg", "job"]
    add_overrides(argv, "c=3")
    assert argv == ["prog", "--cfg", "job", "c=3"]
