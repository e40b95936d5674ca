"""``mink-ssl-pretrain``: Hydra entry point of pretraining (see configs/pretrain.yaml).

Single process: ``mink-ssl-pretrain data.root=...``; several: ``torchrun --nproc_per_node N
-m mink_ssl.cli.pretrain data.root=...`` (the run directory must then be given explicitly, e.g.
``hydra.run.dir=runs/pt1``, so that every rank agrees on it).
"""
from __future__ import annotations

from pathlib import Path

from mink_ssl.cli import _hydra
from mink_ssl.cli._hydra import CONFIG_DIR, hydra_main, register_schema

PROG = "mink-ssl-pretrain"
GROUPS = ("model", "data", "optim", "objective")


def _register_schema() -> None:
    from mink_ssl.tasks.pretrain import PretrainConfig

    register_schema("pretrain_schema", PretrainConfig)


def check_group_choices(overrides: list[str], config_dir: Path = CONFIG_DIR) -> None:
    """Pretraining's config groups (``model``, ``data``, ``optim``, ``objective``), checked."""
    _hydra.check_group_choices(overrides, GROUPS, config_dir)


def _task(cfg, out_dir: Path) -> None:
    from mink_ssl.tasks.pretrain import pretrain

    pretrain(cfg, out_dir)


def _check(cfg) -> None:
    from mink_ssl.tasks.pretrain_config import check_pretrain_config

    check_pretrain_config(cfg)

def main() -> None:
    hydra_main(PROG, "pretrain", _register_schema, _task, GROUPS, check=_check)


if __name__ == "__main__":
    main()
