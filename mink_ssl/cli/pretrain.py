"""``mink-ssl-pretrain``: Hydra entry point of pretraining (see configs/pretrain.yaml).

Single process: ``mink-ssl-pretrain data.root=...``; several: ``torchrun --nproc_per_node N
-m mink_ssl.cli.pretrain data.root=...`` (the run directory must then be given explicitly, e.g.
``hydra.run.dir=runs/pt1``, so that every rank agrees on it).
"""
from __future__ import annotations

import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def _register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    from mink_ssl.engine.config import PretrainConfig

    ConfigStore.instance().store(name="pretrain_schema", node=PretrainConfig)


GROUPS = ("model", "data", "optim", "objective")


def check_group_choices(overrides: list[str], config_dir: Path = CONFIG_DIR) -> None:
    """``group=name`` / ``group=[a,b]`` overrides must name existing configs; the error lists
    the options (Hydra does not for list selections)."""
    for arg in overrides:
        key, _, value = arg.lstrip("+~").partition("=")
        if key not in GROUPS or not value:
            continue
        available = sorted(p.stem for p in (config_dir / key).glob("*.yaml"))
        for name in value.strip("[]").split(","):
            name = name.strip()
            if name and name not in available:
                raise ValueError(f"unknown {key} {name!r}; available: {', '.join(available)}")


def main() -> None:
    import hydra
    from omegaconf import OmegaConf

    try:
        check_group_choices(sys.argv[1:])
    except ValueError as e:
        print(f"mink-ssl-pretrain: error: {e}", file=sys.stderr)
        sys.exit(2)
    _register_schema()

    @hydra.main(config_path=str(CONFIG_DIR), config_name="pretrain", version_base="1.3")
    def run(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        from mink_ssl.engine.pretrain import pretrain

        out_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            pretrain(OmegaConf.to_object(cfg), out_dir)
        except (ValueError, KeyError, FileNotFoundError, FloatingPointError) as e:
            print(f"mink-ssl-pretrain: error: {e}", file=sys.stderr)
            sys.exit(2)

    run()


if __name__ == "__main__":
    main()
