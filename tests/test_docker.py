"""The Docker image's recipe, parsed with a real Dockerfile parser (no Docker engine needed), held
to what makes the build work: the stack the CUDA build check proved, a context that holds every
tracked file, variables that `make setup` reads, system packages that scripts/setup.sh checks
(the build runs it as a non-root user who cannot install them), build guards that fail for the
reason they name, and launch scripts that run the modules they name."""
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dockerfile():
    from dockerfile_parse import DockerfileParser

    return DockerfileParser(path=str(REPO / "docker" / "Dockerfile"))


def _values(parser, instruction: str) -> list[str]:
    return [i["value"] for i in parser.structure if i["instruction"] == instruction]


def _setup_run(parser) -> str:
    setup = [r for r in _values(parser, "RUN") if r.startswith("make setup")]
    assert len(setup) == 1, setup
    return setup[0]


def test_image_stack_is_the_one_the_cuda_build_check_proved(dockerfile):
    record = json.loads((REPO / "scripts" / "cuda_build_check.json").read_text())
    assert record["result"]["compiled"] and record["result"]["is_cuda_available"], record
    stack = record["stack"]
    torch_spec = dockerfile.args["TORCH_SPEC"]
    assert torch_spec == "torch==" + stack["torch"].split("+")[0], (torch_spec, stack["torch"])
    m = re.fullmatch(r"nvidia/cuda:(\d+\.\d+)\.\d+-(?:cudnn\d*-)?devel-ubuntu\d+\.\d+",
                     dockerfile.baseimage)  # resolved from the ARG before FROM
    assert m and m.group(1) == stack["torch_cuda"], (dockerfile.baseimage, stack["torch_cuda"])
    assert dockerfile.args["TORCH_INDEX_URL"] in ("", '""')  # PyPI's torch is that CUDA build
    archs = dockerfile.args["TORCH_CUDA_ARCH_LIST"].strip('"').split(";")
    assert set(stack["arch_list"].split(";")) <= set(archs), (stack["arch_list"], archs)
    assert all(float(a) >= 7.5 for a in archs)  # nvcc 13 compiles nothing older (docs)


def _dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    """(is an exception, regex) per .dockerignore line, Docker's matching: patterns are relative
    to the context root, ``*`` stays within a path element, ``**`` spans any number of them, and a
    matching directory excludes everything below it; the last matching line decides."""
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/").removeprefix("./")
        regex = ""
        for part in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                part, re.escape(part))
        rules.append((negate, re.compile(regex)))
    return rules


def _ignored(path: str, rules) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for negate, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


def test_the_build_context_holds_every_tracked_file_and_no_local_state():
    """`COPY . .` copies the context less .dockerignore: every file of the repository must reach
    the image (make setup reads Makefile, setup.py, scripts/), and the local venv, runs, build
    outputs and caches must not (they would bloat the context or shadow the image's own)."""
    rules = _dockerignore_rules()
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    assert len(tracked) > 100
    assert [f for f in tracked if _ignored(f, rules)] == []
    for needed in ("Makefile", "setup.py", "scripts/setup.sh", "scripts/build_minkowski.py"):
        assert needed in tracked, needed
    for local in (".venv/bin/python", ".git/HEAD", "runs/pt/model.pth", "build/gpu-check/x.whl",
                  "mink_ssl/__pycache__/a.pyc", "mink_ssl.egg-info/PKG-INFO", "outputs/x/y.log",
                  "w.pth", "scan.sens", ".pytest_cache/v/x"):
        assert _ignored(local, rules), local
    # the matcher is Docker's: a root-anchored name does not match deeper down
    assert not _ignored("tests/runs_helper.py", rules) and not _ignored("docs/build.md", rules)


def test_make_setup_reads_every_variable_the_image_passes_and_builds_me_for_cuda(dockerfile):
    run = _setup_run(dockerfile)
    passed = dict(re.findall(r"\b([A-Z_]+)=(\S+)", run))
    assert passed["ME_CUDA"] == "yes"  # no GPU is visible during `docker build`
    assert passed["ME_BUILD"] == "yes"  # a failed ME build fails the image, not a silent skip
    readers = "".join((REPO / p).read_text() for p in ("Makefile", "scripts/setup.sh",
                                                       "scripts/build_minkowski.py"))
    for name in [*passed, "VENV", "MINK_SSL_CACHE"]:  # make exports command-line variables
        assert re.search(rf"\$\{{?{name}\b|environ\.get\(\"{name}\"\)|environ\[\"{name}\"\]",
                         readers), f"{name} is set by the Dockerfile but nothing reads it"
    # the venv the setup builds is the one the guards and PATH use
    env = dict(e.split("=", 1) for e in shlex.split(" ".join(_values(dockerfile, "ENV"))))
    workdir = _values(dockerfile, "WORKDIR")[-1]
    assert env["VENV"] == f"{workdir}/.venv" and env["PATH"].startswith(f"{env['VENV']}/bin:")
    # the patches have one home: `make setup` -> scripts/setup.sh -> scripts/build_minkowski.py
    assert "bash scripts/setup.sh" in (REPO / "Makefile").read_text()
    assert "scripts/build_minkowski.py" in (REPO / "scripts" / "setup.sh").read_text()
    text = (REPO / "docker" / "Dockerfile").read_text()
    assert "collections.abc" not in text and "numpy.distutils" not in text


def test_the_image_installs_the_system_packages_setup_checks(dockerfile):
    """scripts/setup.sh runs as the non-root user: a package it checks for that the image lacks
    makes it try apt-get without root, and the build fails."""
    setup = (REPO / "scripts" / "setup.sh").read_text()
    wanted = re.search(r"^APT_PACKAGES=\(([^)]*)\)", setup, re.M).group(1).split()
    apt = [r for r in _values(dockerfile, "RUN") if "apt-get install" in r]
    assert len(apt) == 1
    installed = set(shlex.split(apt[0].split("apt-get install", 1)[1].split("&&")[0]))
    assert wanted and set(wanted) <= installed, set(wanted) - installed
    runs = _values(dockerfile, "RUN")
    assert runs.index(apt[0]) < runs.index(_setup_run(dockerfile))


def test_build_guards_fail_for_the_reason_they_name(dockerfile):
    """The two checks after `make setup`, run here as the image runs them: each exits 0 exactly
    when its engine is usable and otherwise fails the build with its message."""
    from mink_ssl.models.engines import engine_unavailable

    runs = _values(dockerfile, "RUN")
    setup_at = runs.index(_setup_run(dockerfile))
    guards = [shlex.split(r) for r in runs if r.startswith(".venv/bin/python -c")]
    assert len(guards) == 2
    assert all(runs.index(r) > setup_at for r in runs if r.startswith(".venv/bin/python -c"))
    me, spconv = sorted(guards, key=lambda g: "spconv" in g[2])

    def run(code):
        return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                              text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))

    done = run(spconv[2])
    assert (done.returncode == 0) == (engine_unavailable("spconv") is None), done.stderr
    if importlib.util.find_spec("MinkowskiEngine") is None:
        return
    cuda = run("import MinkowskiEngine as ME; print(ME.is_cuda_available())").stdout.split()[-1]
    done = run(me[2])
    assert (done.returncode == 0) == (cuda == "True"), done.stderr
    if cuda != "True":  # this machine's CPU-only build is what the guard must refuse
        assert "MinkowskiEngine was built CPU-only" in done.stderr


def test_image_runs_as_a_user_who_owns_the_project_and_its_command_exists(dockerfile):
    runs = _values(dockerfile, "RUN")
    users = _values(dockerfile, "USER")
    assert users and users[-1] not in ("root", "0")
    assert any(r.startswith("useradd") and r.split()[-1] == users[-1] for r in runs)
    workdir = _values(dockerfile, "WORKDIR")[-1]
    assert f"chown {users[-1]}:{users[-1]} {workdir}" in runs  # make setup writes .venv there
    assert _values(dockerfile, "COPY") == [f"--chown={users[-1]}:{users[-1]} . ."]
    cmd = json.loads(_values(dockerfile, "CMD")[-1])
    assert cmd[0] == "make" and re.search(rf"^{cmd[1]}:", (REPO / "Makefile").read_text(), re.M)
    scripts = re.findall(r'"(mink-ssl-[\w-]+)=', (REPO / "setup.py").read_text())
    for command in set(re.findall(r"\bmink-ssl-[\w-]+", (REPO / "docker" / "Dockerfile")
                                  .read_text())):
        assert command in scripts, f"the Dockerfile names {command}, setup.py installs {scripts}"


@pytest.mark.parametrize("script", ["launch_single_node.sh", "launch_multi_node.sh",
                                    "slurm_pretrain.sbatch"])
def test_launch_scripts_are_executable_bash_that_run_existing_modules(script):
    """What they run is tested in tests/test_launch.py and tests/test_torchrun_stop.py; here:
    they parse, are executable (their usage lines run them directly), and every ``-m`` module they
    start exists."""
    path = REPO / "docker" / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    assert os.access(path, os.X_OK), f"chmod +x {path}"
    modules = re.findall(r"-m\s+([\w.]+)", path.read_text())
    assert modules
    for module in modules:
        assert importlib.util.find_spec(module) is not None, module
