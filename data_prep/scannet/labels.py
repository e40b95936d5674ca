"""ScanNet's label map: ``scannetv2-labels.combined.tsv`` (raw category -> NYU40 id), shared by
segmentation and detection prep."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from data_prep.reading import read_text
from mink_ssl.errors import BadInput

LABEL_MAP_NAME = "scannetv2-labels.combined.tsv"


def read_label_map(path: Path) -> dict[str, int]:
    """``raw_category -> nyu40id`` from ScanNet's ``scannetv2-labels.combined.tsv``.

    :class:`BadInput` (naming the file and line) for a file that cannot be read, has no such
    columns, a row whose nyu40id is not an integer, or a category listed twice with different
    ids.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--label-map {path} does not exist; pass ScanNet's "
                                f"{LABEL_MAP_NAME} (it ships with the dataset)")
    with io.StringIO(read_text(path), newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        cols = reader.fieldnames or []
        if "raw_category" not in cols or "nyu40id" not in cols:
            raise BadInput(f"{path} has no raw_category / nyu40id columns (tab-separated "
                           f"header: {cols}); pass ScanNet's {LABEL_MAP_NAME}")
        mapping: dict[str, int] = {}
        for row in reader:  # ~600 categories
            line = reader.line_num
            if not (row["nyu40id"] or "").strip():
                continue  # a category without a NYU40 class
            try:
                nyu = int(row["nyu40id"])
            except (TypeError, ValueError):
                raise BadInput(f"{path} line {line}: nyu40id {row['nyu40id']!r} of "
                               f"{row['raw_category']!r} is not an integer") from None
            old = mapping.setdefault(row["raw_category"], nyu)
            if old != nyu:
                raise BadInput(f"{path} line {line}: {row['raw_category']!r} maps to nyu40id "
                               f"{nyu} here and to {old} above")
    if not mapping:
        raise BadInput(f"{path} has no rows")
    return mapping
