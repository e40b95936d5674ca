"""The training paths import without open3d (and without hydra): a GPU machine may have neither.

Each module is imported in a fresh interpreter whose ``sys.meta_path`` refuses open3d, hydra
and omegaconf, so an import that reaches them at module level fails here."""
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("open3d", "hydra", "omegaconf")
# everything that trains from prepared data: models, objectives, engine, datasets, batches
TRAINING_PACKAGES = ("mink_ssl.models", "mink_ssl.objectives", "mink_ssl.engine", "mink_ssl.data",
                     "mink_ssl.ops", "mink_ssl.eval")

BLOCKER = """
import importlib.abc, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError(f'{{name}} is blocked by the test (a GPU machine may not have it)')
        return None
sys.meta_path.insert(0, Blocker())
"""


def _modules() -> list[str]:
    names = []
    for pkg in TRAINING_PACKAGES:
        path = REPO / Path(*pkg.split("."))
        names.append(pkg)
        names += [f"{pkg}.{m.name}" for m in pkgutil.iter_modules([str(path)])]
    return names


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER.format(blocked=BLOCKED) + code],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_blocker_really_blocks():
    proc = _run("import open3d")
    assert proc.returncode != 0 and "blocked by the test" in proc.stderr


@pytest.mark.slow
def test_training_paths_import_without_open3d_or_hydra():
    modules = _modules()
    assert len(modules) > 20 and "mink_ssl.models.res16unet" in modules
    code = ("import importlib\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            f"assert not any(m.split('.')[0] in {BLOCKED!r} for m in sys.modules)\n"
            "print('ok', len(sys.modules))\n")
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpu_check", "gpu_checks"])
def test_gpu_check_imports_without_open3d_or_hydra(name):
    proc = _run(f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'scripts')!r}]; import importlib; "
                f"importlib.import_module({name!r})")
    assert proc.returncode == 0, proc.stderr[-3000:]
