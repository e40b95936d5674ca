"""What the Hydra entry points share: the config directory, group-choice checks, the typed
schema registration and one ``main`` that turns the library's input errors into exit code 2."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from hydra.experimental.callback import Callback


def _config_dir() -> Path:
    """The hydra configs: shipped inside the installed package (``mink_ssl/configs``, see
    setup.py), or the top-level ``configs/`` of a source checkout."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[1] / "configs", here.parents[2] / "configs"):
        if (candidate / "pretrain.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"mink-ssl's configs are neither in {here.parents[1] / 'configs'} "
                            f"(an installed package) nor in {here.parents[2] / 'configs'} (a "
                            "source checkout); reinstall mink-ssl (pip install .)")


CONFIG_DIR = _config_dir()
#: errors that mean "bad input" (printed as one line, exit 2), not a bug (traceback)
INPUT_ERRORS = (ValueError, KeyError, FileNotFoundError, FloatingPointError)


def check_group_choices(overrides: list[str], groups: tuple[str, ...],
                        config_dir: Path = CONFIG_DIR, names: dict[str, str] | None = None
                        ) -> None:
    """``group=name`` / ``group=[a,b]`` overrides must name existing configs; the error lists
    the options (Hydra does not for list selections) under the key the user typed
    (``names``: group -> that key)."""
    for arg in overrides:
        key, _, value = arg.lstrip("+~").partition("=")
        if key not in groups or not value:
            continue
        available = sorted(p.stem for p in (config_dir / key).glob("*.yaml"))
        for name in value.strip("[]").split(","):
            name = name.strip()
            if name and name not in available:
                said = (names or {}).get(key, key)
                raise ValueError(f"unknown {said} {name!r}; available: {', '.join(available)}")


#: the one key that selects a fine-tuning task's benchmark recipe, on every fine-tuning command
RECIPE_KEY = "recipe"


def recipe_overrides(overrides: list[str], recipe_group: str) -> list[str]:
    """``recipe=<name>`` selects the task's recipe (the config group ``recipe_group``, e.g.
    ``configs/finetune/`` for segmentation, ``configs/detection/`` for detection); the group's
    own name keeps working for commands written before ``recipe=``. Both at once is an error."""
    out, given = [], []
    for arg in overrides:
        prefix = arg[:len(arg) - len(arg.lstrip("+~"))]
        key, eq, value = arg[len(prefix):].partition("=")
        if eq and key in (RECIPE_KEY, recipe_group):
            given.append(arg)
            arg = f"{prefix}{recipe_group}={value}"
        out.append(arg)
    if len(given) > 1:
        raise ValueError(f"the recipe is selected twice ({', '.join(given)}); give "
                         f"{RECIPE_KEY}=<name> once")
    return out


#: what the command's start found before Hydra created anything (filled by StartCheck)
_START: dict = {}


def _start_record(config) -> dict | None:
    """What exists where Hydra is about to write (the run directory and its missing parents,
    the job log, ``.hydra/``), so that a failed start removes only what it created."""
    import copy
    import os

    from omegaconf import OmegaConf, open_dict, read_write

    try:
        out = Path(os.path.abspath(str(OmegaConf.select(config, "hydra.run.dir"))))
        config = copy.deepcopy(config)
        with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
            config.hydra.runtime.output_dir = str(out)  # as Hydra sets it next
        log = OmegaConf.select(config, "hydra.job_logging.handlers.file.filename", default=None)
        sub = OmegaConf.select(config, "hydra.output_subdir", default=None)
    except Exception:  # an interpolation only Hydra resolves later: record nothing
        return None
    top = None  # the highest folder Hydra's mkdir(parents=True) creates
    for folder in (out, *out.parents):
        if _there(folder):
            break
        top = folder
    log = Path(os.path.abspath(str(log))) if log else None
    sub = out / str(sub) if sub is not None else None
    return {"out": out, "top": top,
            "log": log if log is not None and not _there(log) else None,
            "hydra": sub if sub is not None and not _there(sub) else None}


def _there(path: Path) -> bool:
    """Whether ``path`` exists (a symlink counts); a path that cannot be looked up (a name
    too long, a file as a folder) does not."""
    try:
        return path.exists() or path.is_symlink()
    except OSError:
        return False


def _run_dir_problem(rec: dict | None) -> str | None:
    """Why the run directory Hydra is about to create cannot hold the run (a name longer than
    its file system allows, a read-only file system, no permission, a file in its way), or
    None. Creates the directory as Hydra would next (a failed start removes it again)."""
    import errno
    import os

    from mink_ssl.errors import write_hint

    if rec is None:
        return None
    out = rec["out"]
    fix = "choose another hydra.run.dir"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            base = next((p for p in out.parents if _there(p)), Path("/"))
            try:
                limit = os.pathconf(base, "PC_NAME_MAX")
            except (OSError, ValueError):
                limit = 255
            longest = max(out.parts, key=lambda part: len(os.fsencode(part)))
            return (f"cannot create the run directory {out}: the folder name "
                    f"{longest[:40]}... is {len(os.fsencode(longest))} bytes long, more than "
                    f"the {limit} its file system allows; {fix} with shorter names")
        if e.errno in (errno.EEXIST, errno.ENOTDIR):
            return (f"cannot create the run directory {out}: {e.strerror} "
                    f"({e.filename or out}): a file is in its way; {fix}")
        return (f"cannot create the run directory {out}: {e.strerror} ({e.filename or out}); "
                f"{write_hint(e).replace('output directory', 'hydra.run.dir')}")
    if not os.access(out, os.W_OK | os.X_OK):
        how = ("its file system is read-only" if _read_only(out)
               else "no permission to write there")
        return (f"cannot write into the run directory {out}: {how}; {fix}"
                f"{'' if _read_only(out) else ' or fix its permissions'}")
    return None


def _read_only(path: Path) -> bool:
    import os

    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _remove_created(out_dir: Path) -> None:
    """After a failed start: remove what this start made for the run (recorded before Hydra
    wrote anything): the job log if Hydra created it and it stayed empty, ``.hydra/`` if Hydra
    created it, then the run directory and the parents it needed, each only if this start
    created it and it is empty. A folder or file that was there before is never touched;
    without a record (a multirun job) nothing is removed."""
    import shutil

    from mink_ssl.engine.distributed import rendezvous_from_env

    rec = _START.get("record")
    if rec is None or rec["out"] != Path(out_dir).absolute():
        return
    try:
        if rendezvous_from_env()[0].rank != 0:  # rank 0 tidies up, the others leave it
            return
    except (RuntimeError, ValueError):
        return
    if rec["hydra"] is not None and rec["hydra"].is_dir() and not rec["hydra"].is_symlink():
        shutil.rmtree(rec["hydra"], ignore_errors=True)
    log = rec["log"]
    try:
        if log is not None and log.is_file() and not log.is_symlink() and not log.stat().st_size:
            log.unlink()
    except OSError:
        pass
    if rec["top"] is None:
        return
    folder = rec["out"]
    while True:
        try:
            folder.rmdir()  # only an empty folder
        except OSError:
            return
        if folder == rec["top"]:
            return
        folder = folder.parent


def _task_config(config):
    """The task's part of Hydra's composed config (without the ``hydra`` node)."""
    import copy

    from omegaconf import open_dict, read_write

    task_cfg = copy.deepcopy(config)
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    return task_cfg


class StartCheck(Callback):
    """Hydra callback (``hydra.callbacks``) run after the config is composed and before Hydra
    creates the run directory: records what is there (:func:`_remove_created`), then checks
    every key and value (the task's ``check``); a bad value ends the command with exit code 2
    and nothing written. (Hydra turns a callback's exceptions into warnings, but not the
    ``SystemExit`` this raises.)"""

    def on_run_start(self, config, **kwargs) -> None:
        _START["record"] = _start_record(config)
        check, prog = _START.get("check"), _START.get("prog", "mink-ssl")
        _report_input_errors(prog, lambda: _check(_task_config(config), check))
        problem = _run_dir_problem(_START["record"])  # Hydra's own mkdir / log: a traceback
        if problem:
            print(f"{prog}: error: {problem}", file=sys.stderr)
            sys.exit(2)


def _check(cfg, check) -> object:
    """``cfg``'s keys against its schema and its values (``check``); the typed config."""
    from omegaconf import OmegaConf

    check_schema_keys(cfg)
    typed = OmegaConf.to_object(cfg)
    if check is not None:
        check(typed)
    return typed


def _report_input_errors(prog: str, fn) -> None:
    """``fn()``; a bad input ends the command with its message and exit code 2."""
    from omegaconf.errors import MissingMandatoryValue

    try:
        fn()
    except MissingMandatoryValue as e:  # a ??? key, e.g. data.root
        key = getattr(e, "full_key", None) or str(e)
        print(f"{prog}: error: {key} is not set: pass {key}=<value> on the command line",
              file=sys.stderr)
        sys.exit(2)
    except INPUT_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


def check_schema_keys(cfg, path: str = "") -> None:
    """Every key of a composed config must be a field of its typed schema: Hydra lets
    ``+data.voxle_size=0.1`` add a key to a schema node, which nothing would read. Free-form
    ``dict`` fields (e.g. ``objectives``) are checked where they are used."""
    import dataclasses

    from omegaconf import DictConfig, OmegaConf

    schema = OmegaConf.get_type(cfg)
    if not dataclasses.is_dataclass(schema):
        return
    fields = [f.name for f in dataclasses.fields(schema)]
    extra = [k for k in cfg.keys() if k not in fields]
    if extra:
        import difflib

        hints = {f"{path}{k}": difflib.get_close_matches(str(k), fields, n=1) for k in extra}
        said = ", ".join(f"{k!r}" + (f" (did you mean {path}{m[0]}?)" if m else "")
                         for k, m in hints.items())
        raise ValueError(f"unknown config key(s) {said}: {path.rstrip('.') or 'the config'} "
                         f"has {fields}. A leading '+' adds a key nothing reads; drop it and fix "
                         "the name")
    for name in fields:
        node = cfg._get_node(name)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            check_schema_keys(node, f"{path}{name}.")


def stop_exit_code(e, prog: str) -> int:
    """The exit code of a run stopped cleanly by a signal (checkpoint saved): 128 + signal,
    the shell's convention, except under torchrun: torchrun counts every non-zero exit of a
    worker as a failure (it ends with ChildFailedError and exit 1, and with --max-restarts it
    would start the workers afresh into the stopped run), so a worker exits 0 there, saying so.
    """
    from mink_ssl.signals import under_torchrun

    if not under_torchrun():
        return e.exit_code
    print(f"{prog}: exits 0, not {e.exit_code}, under torchrun: torchrun reports any other exit "
          "as a failed worker. The run is not finished: resume it as said above",
          file=sys.stderr)
    return 0


def add_overrides(argv: list[str], *extra: str) -> None:
    """Put ``extra`` overrides next to the user's own in ``argv``: Hydra's parser takes the
    overrides as one run of positional arguments, so after an option (``--cfg job``) they
    would be refused as unrecognised."""
    last = max((i for i, a in enumerate(argv[1:], 1) if "=" in a and not a.startswith("-")),
               default=len(argv) - 1)
    argv[last + 1:last + 1] = extra


def register_schema(name: str, schema: type) -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=name, node=schema)


def hydra_main(prog: str, config_name: str, register: Callable[[], None],
               task: Callable[[object, Path], object], groups: tuple[str, ...],
               check: Callable[[object], object] | None = None,
               recipe_group: str | None = None) -> None:
    """Compose ``configs/<config_name>.yaml`` from the command line (``register`` stores its
    schema first), check every key and value (``check(typed config)``) before Hydra creates the
    run directory, then ``task(typed config, run directory)``. A start that fails removes only
    what it created. ``recipe_group``: the config group ``recipe=`` selects (fine-tuning)."""
    import hydra

    try:
        if recipe_group is not None:
            sys.argv[1:] = recipe_overrides(sys.argv[1:], recipe_group)
            groups = (*groups, recipe_group)
        check_group_choices(sys.argv[1:], groups,
                            names={recipe_group: RECIPE_KEY} if recipe_group else None)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    register()
    # Hydra would write .hydra/*.yaml into the run directory before the run's checks (and over
    # an existing run's); the run writes its resolved config.json itself once they pass
    if not any(a.lstrip("+~").startswith("hydra.output_subdir") for a in sys.argv[1:]):
        add_overrides(sys.argv, "hydra.output_subdir=null")
    # the checks, and the record of what exists, before Hydra creates the run directory
    _START.update(check=check, prog=prog, record=None)
    add_overrides(sys.argv, f"+hydra.callbacks.mink_ssl_start._target_={__name__}.StartCheck")

    @hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")
    def run(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        from mink_ssl.errors import Interrupted, OutputError

        from mink_ssl.locks import DirectoryLocked

        out_dir = Path(HydraConfig.get().runtime.output_dir)
        code = 0
        try:
            typed = []
            _report_input_errors(prog, lambda: typed.append(_check(cfg, check)))
            task(typed[0], out_dir)
        except SystemExit as e:
            code = e.code
        except INPUT_ERRORS as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            code = 2
        except (OutputError, DirectoryLocked) as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            code = 1
        except Interrupted as e:  # SIGINT / SIGTERM: checkpoint saved at a step boundary
            print(f"{prog}: {e}", file=sys.stderr)
            sys.exit(stop_exit_code(e, prog))
        if code:
            _remove_created(out_dir)
            sys.exit(code)

    run()
