"""The benchmark tsv files of MMBench and VLMEvalKit: one question per row, images as base64 cells.

Read with the csv module (pandas writes these files; its quoting is csv's), without pandas. VLMEvalKit
stores each image once: a row whose `image` cell is short (at most 64 characters) holds the `index` of
the row with the picture instead (`resolve_images`).
"""

from __future__ import annotations

import csv
import dataclasses
import sys
from pathlib import Path
from typing import Sequence

from owl_jax.evals.base import BenchmarkError


def read_tsv(path: str | Path, required: Sequence[str], what: str) -> tuple[list[str], list[dict]]:
    """(header, rows as {column: cell}); BenchmarkError naming the file and the missing columns."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{what} {path} does not exist")
    csv.field_size_limit(sys.maxsize)  # base64 images are megabytes in one cell
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter="\t")
            header = next(reader, None)
            if header is None:
                raise BenchmarkError(f"{what} {path} is empty")
            rows = []
            for cells in reader:
                if not cells:
                    continue
                if len(cells) != len(header):
                    raise BenchmarkError(f"{what} {path} line {reader.line_num} has {len(cells)} cells, "
                                         f"the header {len(header)}")
                rows.append(dict(zip(header, cells)))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise BenchmarkError(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise BenchmarkError(f"{what} {path} has no {', '.join(repr(c) for c in missing)} column "
                             f"(columns: {', '.join(header[:12])})")
    return header, rows


@dataclasses.dataclass
class Images:
    data: dict[str, str]  # index -> base64 of its image
    source: dict[str, str]  # index -> index of the row that holds the picture


def resolve_images(rows: list[dict], path: str | Path) -> Images:
    cells = {row["index"]: row["image"] for row in rows}
    data, source = {}, {}
    for row in rows:
        index, cell = row["index"], row["image"]
        if len(cell) <= 64:
            if cell not in cells or len(cells[cell]) <= 64:
                raise BenchmarkError(f"{path}: row {index}'s image refers to row {cell!r}, which has no image")
            data[index], source[index] = cells[cell], cell
        else:
            data[index], source[index] = cell, index
    return Images(data, source)
