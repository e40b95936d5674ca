"""Golden numbers say where they come from (#27 item 9).

The convention, for every tests/test_*.py:

- A golden constant (numbers produced by, or read from, the released code) has a note in the
  comments directly above it (above the first of a run of constants with no blank line between
  them, which one note may cover together) or on its own lines: ``golden:`` naming the released
  repository, file and function (a path such as ``lib/ddp_trainer.py``), and ``how:`` it was run
  or read (inputs, seed, settings, the commit that added it, whether it was re-run). Where that is
  not known the note says ``(provenance not recorded)`` instead of a path.
- A constant is golden when its name says so (``RELEASED``, ``GOLDEN``, ``VOTENET``, ``CSC_``,
  ``MEASURED``). In a file holding golden values, every other table of numbers (a list, tuple,
  dict or set literal with two or more numbers) must say ``golden:`` or ``input:``, so a golden
  table under another name is not silently left without its note.
- A test named ``*released*`` or ``*golden*`` uses a noted golden constant or carries a
  ``golden:`` note itself (docstring or comment).
- Every test that docs/fidelity.md names in its "golden test" column exists.
"""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOLDEN_NAME = re.compile(r"RELEASED|GOLDEN|VOTENET|^CSC_|MEASURED")
GOLDEN_TEST = re.compile(r"released|golden")
SOURCE = re.compile(r"[\w.-]+/[\w./-]*\.(py|sh|yaml|npz|cpp|m)\b|\(provenance not recorded\)")


def _comments(text: str) -> dict[int, str]:
    """{line: comment text} of every comment token of ``text``."""
    return {tok.start[0]: tok.string for tok in tokenize.generate_tokens(io.StringIO(text).readline)
            if tok.type == tokenize.COMMENT}


def _is_table(node: ast.AST) -> bool:
    """A list / tuple / dict / set literal holding two or more numbers."""
    if not isinstance(node, (ast.List, ast.Tuple, ast.Dict, ast.Set)):
        return False
    numbers = [n for n in ast.walk(node) if isinstance(n, ast.Constant)
               and isinstance(n.value, (int, float)) and not isinstance(n.value, bool)]
    return len(numbers) >= 2


def check_source(text: str, name: str = "<test>") -> list[str]:
    """The convention's violations in one test file's source, one line each."""
    tree = ast.parse(text)
    lines = text.splitlines()
    comments = _comments(text)
    consts: list[tuple[str, ast.AST, str]] = []  # (name, statement, its note)
    group_start = None
    prev_end = None
    for stmt in tree.body:
        target = None
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target = stmt.targets[0]
        elif isinstance(stmt, ast.AnnAssign):
            target = stmt.target
        is_const = isinstance(target, ast.Name) and target.id.isupper()
        if not is_const:
            group_start, prev_end = None, None
            continue
        gap = lines[prev_end:stmt.lineno - 1] if prev_end is not None else [""]
        if any(not line.strip() for line in gap) or group_start is None:
            group_start = stmt.lineno  # a new run of constants: its note is above it
            while group_start > 1 and lines[group_start - 2].lstrip().startswith("#"):
                group_start -= 1
        note = " ".join(comments[i] for i in range(group_start, stmt.end_lineno + 1)
                        if i in comments)
        consts.append((target.id, stmt, note))
        prev_end = stmt.end_lineno

    def golden_note(note: str) -> bool:
        return "golden:" in note and "how:" in note and bool(SOURCE.search(note))

    problems = []
    noted = {n for n, _, note in consts if golden_note(note)}
    golden_file = any(GOLDEN_NAME.search(n) for n, _, _ in consts) or "golden:" in " ".join(
        comments.values())
    for const, stmt, note in consts:
        if GOLDEN_NAME.search(const) and const not in noted:
            problems.append(f"{name}:{stmt.lineno} {const}: golden constant without a "
                            "'# golden: <repository> <file> <function> ... how: ...' note")
        elif golden_file and _is_table(stmt.value) and const not in noted and "input:" not in note:
            problems.append(f"{name}:{stmt.lineno} {const}: a table of numbers in a file of golden "
                            "values: say '# golden: ... how: ...' or '# input: ...' above it")
    for fn in ast.walk(tree):
        if not (isinstance(fn, ast.FunctionDef) and fn.name.startswith("test_")
                and GOLDEN_TEST.search(fn.name)):
            continue
        used = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)}
        own = " ".join([ast.get_docstring(fn) or ""] + [
            comments[i] for i in range(fn.lineno, fn.end_lineno + 1) if i in comments])
        if not (used & noted) and not golden_note(own):
            problems.append(f"{name}:{fn.lineno} {fn.name}: uses no noted golden constant and has "
                            "no 'golden: ... how: ...' note of its own")
    return problems


def test_every_golden_value_in_the_tests_has_its_provenance():
    problems = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        if path.name != Path(__file__).name:  # this file names the markers, it holds no values
            problems += check_source(path.read_text(), path.name)
    assert problems == [], "\n".join(problems)


def test_the_check_finds_a_golden_value_without_its_note():
    bare = ("RELEASED_LOSS = [0.5, 0.25]\n\n\ndef test_loss_equals_released():\n"
            "    assert RELEASED_LOSS\n")
    assert [p.split(" ", 2)[1] for p in check_source(bare)] == [
        "RELEASED_LOSS:", "test_loss_equals_released:"]
    noted = ("# golden: org/repo lib/trainer.py Trainer.loss; how: seed 0, CPU\n" + bare)
    assert check_source(noted) == []
    # a note without a source file or without how it was run is not a note
    assert check_source("# golden: the released code; how: seed 0\n" + bare) != []
    assert check_source("# golden: org/repo lib/trainer.py Trainer.loss\n" + bare) != []
    # a blank line ends the run of constants a note covers; the other table must say what it is
    split = noted + "\nINPUT = [1, 2]\n"
    assert [p.split(" ", 2)[1] for p in check_source(split)] == ["INPUT:"]
    assert check_source(noted + "\n# input: fixed weights\nINPUT = [1, 2]\n") == []
    assert check_source(noted.replace("\n\n\ndef", "\nSEED = 3\n\n\ndef")) == []  # a scalar
    assert check_source("# golden: unknown (provenance not recorded); how: unknown\n" + bare) == []


def _fidelity_golden_cells() -> list[str]:
    """The "golden test" cells of docs/fidelity.md's table of the released code."""
    cells, column = [], None
    for line in (REPO / "docs" / "fidelity.md").read_text().splitlines():
        if not line.startswith("|"):
            column = None
            continue
        row = [c.strip() for c in line.strip("|").split("|")]
        if "golden test" in row:
            column = row.index("golden test")
        elif column is not None and not set(line) <= set("|- "):
            cells.append(row[column])
    return cells


def test_every_golden_test_named_in_docs_fidelity_exists():
    cells = _fidelity_golden_cells()
    assert len(cells) >= 15  # the table's rows
    missing = []
    for cell in cells:
        current = None
        for path, name in re.findall(r"(?:(tests/test_\w+\.py)::)?(test_\w+\*?)", cell):
            current = path or current
            files = [REPO / current] if current else sorted((REPO / "tests").glob("test_*.py"))
            defined = set()
            for f in files:
                defined |= {n.name for n in ast.walk(ast.parse(f.read_text()))
                            if isinstance(n, ast.FunctionDef)}
            stem = name.rstrip("*")
            if not any(d == name or (name.endswith("*") and d.startswith(stem)) for d in defined):
                missing.append(f"{current or 'tests/'}::{name}")
    assert missing == [], f"docs/fidelity.md names tests that do not exist: {missing}"
