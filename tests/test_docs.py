"""The user documentation stays honest: README.md and docs/*.md (the pages git tracks) cite only
files that are in the repository, the README stays short enough to read (at most 250 lines), links the pages a
newcomer needs, and names the test command CI runs.

A cited path is a repository-rooted path (``mink_ssl/...``, ``data_prep/...``, ``configs/...``,
``docs/...``, ``tests/...``, ``benchmarks/...``, ``scripts/...``, ``docker/...``,
``experiments/...``, ``.ci/...``, or ``Makefile``, ``setup.py``, ``README.md``,
``.dockerignore``) anywhere in the text, or the target of a relative Markdown link (resolved
against the page's folder). ``{a,b}`` expands, ``<name>`` and ``*`` match any name. It exists
when some file or folder matches on disk and, in a git checkout, git tracks it (a file left
uncommitted would be missing from every clone). Cells of a table column headed "released file"
cite other projects' files (docs/fidelity.md) and are not ours to check.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_README_LINES = 250

_TOP = r"(?:mink_ssl|data_prep|configs|docs|tests|benchmarks|scripts|docker|experiments|\.ci)"
_PART = r"(?:[\w.*<>/-]|\{[\w.,-]*\})"
_ROOTED = re.compile(r"(?<![\w./~-])(" + _TOP + r"/" + _PART + r"*"
                     r"|(?:Makefile|setup\.py|README\.md|\.dockerignore)(?![\w.-]))")
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_CELL_SPLIT = re.compile(r"(?<!\\)\|")
FOREIGN_COLUMNS = {"released file"}


def _expand_braces(pattern: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    return [p for alt in m.group(1).split(",")
            for p in _expand_braces(pattern[:m.start()] + alt + pattern[m.end():])]


def _without_foreign_cells(text: str) -> list[str]:
    """The lines of ``text``, with the cells of "released file" table columns blanked."""
    lines, out, foreign = text.splitlines(), [], set()
    for i, line in enumerate(lines):
        if not line.lstrip().startswith("|"):
            foreign = set()
            out.append(line)
            continue
        cells = _CELL_SPLIT.split(line)
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if re.fullmatch(r"\s*\|[\s:|-]*-[\s:|-]*", nxt):  # the header row of a table
            foreign = {j for j, c in enumerate(cells) if c.strip().lower() in FOREIGN_COLUMNS}
        out.append("|".join("" if j in foreign else c for j, c in enumerate(cells)))
    return out


def cited_paths(text: str, page_dir: Path) -> list[tuple[int, str, Path]]:
    """(line number, citation as written, pattern relative to the repository) of every
    repository path ``text`` cites; ``page_dir`` resolves relative Markdown links."""
    found = []
    for n, line in enumerate(_without_foreign_cells(text), 1):
        for m in _ROOTED.finditer(line):
            path = m.group(1).rstrip(".")
            found.append((n, path, Path(path)))
        for m in _LINK.finditer(line):
            written, target = m.group(1), m.group(1).split("#")[0]
            if not target or "://" in target or target.startswith("mailto:"):
                continue
            resolved = (page_dir / target).resolve()
            try:
                found.append((n, written, resolved.relative_to(REPO)))
            except ValueError:
                found.append((n, written, Path("..") / target))  # outside the repository
    return found


def _tracked_files() -> set[str] | None:
    """The files git tracks (staged ones included); None outside a git checkout."""
    try:
        res = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    except OSError:  # no git
        return None
    return set(res.stdout.decode().split("\0")) - {""} if res.returncode == 0 else None


def _pages() -> list[Path]:
    """README.md and docs/*.md; in a git checkout only those git tracks (a page still being
    written is checked once it is added, with the files it cites)."""
    tracked = _tracked_files()
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    return [p for p in pages if tracked is None or p.relative_to(REPO).as_posix() in tracked]


PAGES = _pages()


def exists_in_repo(pattern: Path, tracked: set[str] | None, root: Path = REPO) -> bool:
    """Every ``{a,b}`` alternative matches a tracked file or folder (``<name>`` and ``*``: at
    least one)."""
    if ".." in pattern.parts:
        return False

    def found(glob: str) -> bool:
        matches = list(root.glob(glob)) if "*" in glob else (
            [root / glob] if (root / glob).exists() else [])
        rels = [m.relative_to(root).as_posix() for m in matches]
        return any(tracked is None or r in tracked or any(t.startswith(r + "/") for t in tracked)
                   for r in rels)

    return all(found(re.sub(r"<[^<>]*>", "*", p)) for p in _expand_braces(pattern.as_posix()))


def dead_citations(page: Path, tracked: set[str] | None) -> list[str]:
    return [f"{page.relative_to(REPO)}:{n}: {written}"
            for n, written, pattern in cited_paths(page.read_text(), page.parent)
            if not exists_in_repo(pattern, tracked)]


def test_readme_is_at_most_250_lines():
    n = len((REPO / "README.md").read_text().splitlines())
    assert n <= MAX_README_LINES, (f"README.md has {n} lines, more than {MAX_README_LINES}: move "
                                   "the detail into a docs/ page and link it")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_repository_path_a_page_cites_exists(page):
    assert dead_citations(page, _tracked_files()) == []


def test_a_dead_citation_is_found(tmp_path):
    """The scanner itself: what it must see, and what it must leave alone."""
    page = REPO / "docs" / "example.md"  # never written: cited_paths reads text only
    text = "\n".join([
        "See `mink_ssl/objectives/base.py` and mink_ssl/no_such_module.py, then",
        "[the prep page](prep.md), [gone](missing_page.md#part), [web](https://example.com/x.md),",
        "configs/finetune/{s3dis,nowhere}.yaml and configs/objective/<name>.yaml.",
        "| component | released file |",
        "|---|---|",
        "| ours `tests/test_docs.py` | `scripts/only_in_their_repo.sh` |",
        "After the table: `scripts/not_here.sh`; outside: `../shared/DESIGN.md`.",
    ])
    tracked = _tracked_files()
    cites = [(n, w) for n, w, p in cited_paths(text, page.parent)]
    assert (6, "scripts/only_in_their_repo.sh") not in cites  # a released-file cell
    assert not any(w.startswith("../") for _, w in cites)  # not a repository path
    dead = [(n, w) for n, w, p in cited_paths(text, page.parent) if not exists_in_repo(p, tracked)]
    assert dead == [(1, "mink_ssl/no_such_module.py"), (2, "missing_page.md#part"),
                    (3, "configs/finetune/{s3dis,nowhere}.yaml"), (7, "scripts/not_here.sh")]
    # a file on disk that git does not track is missing from every clone
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "draft.md").write_text("x")
    assert exists_in_repo(Path("docs/draft.md"), None, root=tmp_path)
    assert not exists_in_repo(Path("docs/draft.md"), {"docs/other.md"}, root=tmp_path)
    assert exists_in_repo(Path("docs"), {"docs/draft.md"}, root=tmp_path)


def test_readme_links_the_pages_a_newcomer_needs():
    linked = {p.as_posix() for _, _, p in cited_paths((REPO / "README.md").read_text(), REPO)}
    needed = {f"docs/{name}.md" for name in (
        "prep", "pretraining", "finetuning", "engines", "weights", "gpu_docker", "safety",
        "fidelity", "extending", "architecture")}
    assert needed - linked == set()


def test_readme_test_command_is_the_one_ci_runs():
    """.ci/run runs "the README's test command": the README's two-commands block names it."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Two commands\n+```bash\n(.*?)```", readme, re.S)
    assert block, "README.md lost its '## Two commands' code block"
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert ci[-1] in commands, f".ci/run ends with {ci[-1]!r}, not a command of the README"
    assert re.search(rf"^{re.escape(ci[-1].split()[-1])}:", (REPO / "Makefile").read_text(), re.M)
