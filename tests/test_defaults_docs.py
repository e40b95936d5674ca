"""The tables of defaults in the docs agree with the code: the objectives' argument tables of
docs/pretraining.md are the ones scripts/objective_tables.py generates from the dataclasses, and
its `key | default | meaning` table states the schema's defaults."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def default_at(schema, key: str):
    node = schema
    for part in key.split("."):
        if not dataclasses.is_dataclass(node) or part not in {
                f.name for f in dataclasses.fields(node)}:
            raise KeyError(f"{key}: not a key of {type(schema).__name__}")
        node = getattr(node, part)
    return node


def same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def test_the_docs_objective_tables_are_the_generated_ones():
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "objective_tables.py"),
                          "--check"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_the_table_check_fails_on_a_changed_default(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import objective_tables
    finally:
        sys.path.remove(str(REPO / "scripts"))
    doc = tmp_path / "pretraining.md"
    text = (REPO / "docs" / "pretraining.md").read_text()
    row = "| `temperature` | 0.4 | a number, > 0 | tau of the softmax |"
    assert row in text
    doc.write_text(text.replace(row, row.replace("0.4", "0.5"), 1))
    monkeypatch.setattr(objective_tables, "DOC", doc)
    assert objective_tables.main(["--check"]) == 1
    assert objective_tables.main([]) == 0 and doc.read_text() == text


def table_rows(text: str, header: str):
    """The rows (cells) of the markdown table whose header row starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def split_top(text: str) -> list[str]:
    """Split at commas outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return parts + [cur.strip()]


def doc_value(text: str):
    """A default as the docs write it: ``0.025``, ``[1, 1]``, `` `random` ``, ``1.5 voxels``,
    ``(required)``."""
    import yaml

    text = text.strip().strip("`")
    if text == "(required)":
        return "???"
    if not text.startswith("["):
        text = text.split()[0].strip("`")
    return yaml.safe_load(text)


def test_the_pretraining_key_table_states_the_code_defaults():
    """docs/pretraining.md's `key | default | meaning` table: each key's default as the code
    (the schema, or the config group chosen in configs/pretrain.yaml)."""
    from mink_ssl.tasks.pretrain import PretrainConfig

    schema = PretrainConfig()
    groups = {e if isinstance(e, str) else next(iter(e)): (None if isinstance(e, str)
                                                          else next(iter(e.values())))
              for e in OmegaConf.to_container(OmegaConf.load(CONFIGS / "pretrain.yaml"))["defaults"]}
    checked = 0
    for keys, default, _ in table_rows((REPO / "docs" / "pretraining.md").read_text(),
                                       "| key | default |"):
        names = re.findall(r"`([^`]+)`", keys)
        values = split_top(default)
        if len(names) != len(values):
            continue
        for name, value in zip(names, values):
            if name in groups:
                want = groups[name]
                assert doc_value(value) in (want, [want] if isinstance(want, str) else want), name
            else:
                assert same(doc_value(value), default_at(schema, name)), (name, value)
            checked += 1
    assert checked >= 20


def test_the_readme_key_table_names_the_code_defaults():
    """README.md's configuration table: a ``key | `value` (default)`` cell names the default
    the code has (a config group's choice in configs/pretrain.yaml, else the schema's)."""
    from mink_ssl.tasks.pretrain import PretrainConfig

    groups = {next(iter(e)): next(iter(e.values())) for e in OmegaConf.to_container(
        OmegaConf.load(CONFIGS / "pretrain.yaml"))["defaults"] if isinstance(e, dict)}
    checked = 0
    for line in (REPO / "README.md").read_text().splitlines():
        row = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] if line.startswith("|") else []
        key = re.fullmatch(r"`([\w.]+)`", row[0]) if len(row) >= 2 else None
        named = re.search(r"`([^`]+)` \(default\)", row[1]) if key else None
        if not named:
            continue
        code = groups.get(key.group(1)) or default_at(PretrainConfig(), key.group(1))
        assert named.group(1) == code, (key.group(1), named.group(1), code)
        checked += 1
    if not checked:
        pytest.skip("README.md's tables name no `key` with a `value` (default)")
