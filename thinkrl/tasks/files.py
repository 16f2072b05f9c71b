"""Local data: JSONL, JSON, CSV and Parquet files, and folders written by ``datasets.save_to_disk``.

Every format becomes a list of ``(row number, dict)``; ``task.fields`` says which keys
hold the question, the answer and an optional pass rate. A file that cannot be read
at all (missing, broken line, wrong fields, empty) is a :class:`DataError` naming the
file, the row and what to change; a row that is readable but unusable (empty
question or answer) is skipped and counted, and the count is logged once.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections import Counter
from pathlib import Path

from thinkrl.config import TaskConfig
from thinkrl.tasks import DataError, Example, Task, answers_match

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def is_data_path(name: str) -> bool:
    """A file name with a data suffix, or anything that looks like a path (a saved `datasets` folder)."""
    return name.endswith(SUFFIXES) or "/" in name or Path(name).expanduser().is_dir()


def _jsonl(path: Path) -> list[tuple[int, object]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg}); fix or remove that line") from None
    return rows


def _json(path: Path) -> list[tuple[int, object]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "[]")
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: not valid JSON (line {e.lineno}: {e.msg}); a .json file must hold a list "
            "of objects (use .jsonl for one object per line)"
        ) from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json data file must hold a list of objects")
    return list(enumerate(data, 1))


def _csv(path: Path) -> list[tuple[int, object]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        try:
            # line 1 is the header; a row with more cells than the header has them under the key None
            return [(n, {k: v for k, v in row.items() if k is not None}) for n, row in enumerate(reader, 2)]
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None


def _parquet(path: Path) -> list[tuple[int, object]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError) for a broken file
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    return list(enumerate(table.to_pylist(), 1))


def _saved_dataset(path: Path, split: str) -> list[tuple[int, object]] | None:
    """Rows of ``split`` of a folder written by ``save_to_disk`` (a Dataset is its own train split)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # FileNotFoundError, or a folder that is not a saved dataset
        raise DataError(f"{path}: not a folder written by datasets' save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            if split == "train":
                raise DataError(
                    f"{path}: the saved DatasetDict has no 'train' split (it has: {', '.join(ds)})"
                )
            return None
        ds = ds[split]
    elif split != "train":
        return None
    return list(enumerate(ds.to_list(), 1))


def read_rows(path: Path, split: str = "train") -> list[tuple[int, object]] | None:
    if path.is_dir():
        return _saved_dataset(path, split)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    readers = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}
    if path.suffix not in readers:
        raise DataError(
            f"{path}: unknown data format; use one of {', '.join(SUFFIXES)} or a save_to_disk folder"
        )
    return readers[path.suffix](path)


def to_examples(rows: list[tuple[int, object]], path: Path, fields: dict, name: str) -> list[Example]:
    """Map each row's fields to an Example; skip (and count) rows with an empty question or answer."""
    q, a, pr = (fields.get(k, k) for k in ("question", "answer", "pass_rate"))
    out, skipped = [], Counter()
    for n, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: each row must be a JSON object with '{q}' and '{a}' fields")
        missing = [k for k in (q, a) if k not in row]
        if missing:
            raise DataError(
                f"{path}:{n}: no '{missing[0]}' field (the row has: {', '.join(map(str, row)) or 'none'}); "
                f"each row needs '{q}' and '{a}' fields: name yours with task.fields, "
                "e.g. task.fields.question=problem task.fields.answer=solution"
            )
        if row[a] is None or str(row[a]).strip() == "":
            skipped["an empty answer"] += 1
            continue
        if row[q] is None or str(row[q]).strip() == "":
            skipped["an empty question"] += 1
            continue
        meta = {"line": n}
        if row.get(pr) is not None:
            try:
                meta["pass_rate"] = float(row[pr])
            except (TypeError, ValueError):
                raise DataError(f"{path}:{n}: '{pr}' must be a number in [0, 1], got {row[pr]!r}") from None
        out.append(Example(question=str(row[q]), answer=str(row[a]), task=name, meta=meta))
    for why, count in skipped.items():
        log.warning("%s: skipped %d rows with %s", path, count, why)
    if not out:
        raise DataError(f"{path} holds no usable rows (need rows with non-empty '{q}' and '{a}' fields)")
    return out


def read_examples(path: Path, fields: dict, name: str, split: str = "train") -> list[Example] | None:
    rows = read_rows(path, split)
    return None if rows is None else to_examples(rows, path, fields, name)


class FileTask(Task):
    """Question/answer rows from a local file; answers are checked by :func:`answers_match`."""

    def __init__(self, cfg: TaskConfig):
        path = Path(cfg.name).expanduser()
        self.name = path.stem if path.suffix in SUFFIXES else path.name
        rows = read_examples(path, cfg.fields, self.name)
        held = None
        if cfg.eval_path:
            held = read_examples(Path(cfg.eval_path).expanduser(), cfg.fields, self.name)
        elif path.is_dir():  # a DatasetDict's own held-out split
            held = read_examples(path, cfg.fields, self.name, "test") or read_examples(
                path, cfg.fields, self.name, "validation"
            )
        if held is not None:
            eval_, train = held[: cfg.eval_size], rows
        else:  # hold out a seeded slice of the file
            if len(rows) < 2:
                raise DataError(
                    f"{path} has {len(rows)} usable row(s): too few to hold out an eval set; "
                    "add rows or give task.eval_path"
                )
            order = list(range(len(rows)))
            random.Random(cfg.eval_seed).shuffle(order)
            k = min(cfg.eval_size, max(1, len(rows) // 5))
            eval_ = [rows[i] for i in order[:k]]
            train = [rows[i] for i in order[k:]]
        for ex in train + eval_:
            ex.source = self
        super().__init__(train, eval_, cfg.seed)

    def check(self, pred: str, ex: Example) -> bool:
        return answers_match(pred, ex.answer)


JsonlTask = FileTask  # the name this class had when it read JSONL only
