"""What the Hydra entry points share: the config directory, group-choice checks, the typed
schema registration and one ``main`` that turns the library's input errors into exit code 2."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
#: errors that mean "bad input" (printed as one line, exit 2), not a bug (traceback)
INPUT_ERRORS = (ValueError, KeyError, FileNotFoundError, FloatingPointError)


def check_group_choices(overrides: list[str], groups: tuple[str, ...],
                        config_dir: Path = CONFIG_DIR) -> None:
    """``group=name`` / ``group=[a,b]`` overrides must name existing configs; the error lists
    the options (Hydra does not for list selections)."""
    for arg in overrides:
        key, _, value = arg.lstrip("+~").partition("=")
        if key not in groups or not value:
            continue
        available = sorted(p.stem for p in (config_dir / key).glob("*.yaml"))
        for name in value.strip("[]").split(","):
            name = name.strip()
            if name and name not in available:
                raise ValueError(f"unknown {key} {name!r}; available: {', '.join(available)}")


def register_schema(name: str, schema: type) -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=name, node=schema)


def hydra_main(prog: str, config_name: str, register: Callable[[], None],
               task: Callable[[object, Path], object], groups: tuple[str, ...]) -> None:
    """Compose ``configs/<config_name>.yaml`` from the command line (``register`` stores its
    schema first), then ``task(typed config, run directory)``."""
    import hydra
    from omegaconf import OmegaConf

    try:
        check_group_choices(sys.argv[1:], groups)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    register()

    @hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")
    def run(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        try:
            task(OmegaConf.to_object(cfg), Path(HydraConfig.get().runtime.output_dir))
        except INPUT_ERRORS as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            sys.exit(2)

    run()
