import json
import logging

import pytest

from thinkrl.config import ConfigError, TaskConfig
from thinkrl.tasks import DataError, build_task
from thinkrl.tasks.files import FileTask

ROWS = [{"problem": f"What is {i} + {i}?", "solution": str(2 * i), "source": "x"} for i in range(10)]
FIELDS = {"question": "problem", "answer": "solution"}


def write(path, rows):
    fmt = path.suffix
    if fmt == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == ".json":
        path.write_text(json.dumps(rows))
    elif fmt == ".csv":
        import csv

        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif fmt == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_format_with_a_field_mapping(tmp_path, suffix):
    path = write(tmp_path / f"add{suffix}", ROWS)
    task = build_task(TaskConfig(name=str(path), fields=FIELDS, eval_size=50))
    assert isinstance(task, FileTask) and task.name == "add"
    # 10 rows; the held-out slice is min(eval_size, 10 // 5) = 2
    assert len(task.train) == 8 and len(task.eval) == 2
    ex = next(e for e in task.train + task.eval if e.question == "What is 4 + 4?")
    assert ex.answer == "8" and task.check("8.0", ex)


def test_saved_dataset_folder_uses_its_test_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:7]), "test": datasets.Dataset.from_list(ROWS[7:])}
    )
    dd.save_to_disk(str(tmp_path / "addsaved"))
    task = build_task(TaskConfig(name=str(tmp_path / "addsaved"), fields=FIELDS))
    assert task.name == "addsaved"
    assert sorted(e.answer for e in task.train) == ["0", "10", "12", "2", "4", "6", "8"]
    assert [e.answer for e in task.eval] == ["14", "16", "18"]
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "plain"))  # a Dataset: split off 2 rows
    plain = build_task(TaskConfig(name=str(tmp_path / "plain"), fields=FIELDS))
    assert len(plain.train) == 8 and len(plain.eval) == 2


def test_unusable_rows_are_skipped_and_counted_once(tmp_path, caplog):
    rows = ROWS + [
        {"problem": "no answer", "solution": None, "source": "x"},
        {"problem": "blank answer", "solution": "  ", "source": "x"},
        {"problem": "", "solution": "3", "source": "x"},
    ]
    path = write(tmp_path / "mixed.parquet", rows)
    with caplog.at_level(logging.WARNING):
        task = build_task(TaskConfig(name=str(path), fields=FIELDS))
    assert len(task.train) + len(task.eval) == 10
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("skipped 2 rows with an empty answer" in m for m in msgs) == 1
    assert sum("skipped 1 rows with an empty question" in m for m in msgs) == 1


@pytest.mark.parametrize(
    "suffix,content,match",
    [
        (".csv", "problem,solution\n", "holds no usable rows"),  # header only
        (".csv", "", "holds no usable rows"),  # empty file
        (".csv", "q,a\n1+1,2\n", r":2: no 'problem' field \(the row has: q, a\).*task.fields"),
        (".json", '{"problem": 1}', "must hold a list of objects"),
        (".json", '[{"problem": ', "not valid JSON"),
        (".parquet", "not parquet at all", "not a readable Parquet file"),
        (".jsonl", "", "holds no usable rows"),
        (".jsonl", '{"problem": "1+1", "solution": "2"}\n{"problem": ', r":2: not valid JSON"),
    ],
)
def test_bad_files_are_one_clear_error(tmp_path, suffix, content, match):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match=match) as e:
        build_task(TaskConfig(name=str(path), fields=FIELDS))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_folder_that_is_not_a_saved_dataset(tmp_path):
    (tmp_path / "junk").mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        build_task(TaskConfig(name=str(tmp_path / "junk")))


def test_pass_rate_column_and_filter(tmp_path):
    rows = [{"question": f"q{i}", "answer": str(i), "pass_rate": i / 10} for i in range(11)]
    path = write(tmp_path / "rated.jsonl", rows)
    task = build_task(
        TaskConfig(name=str(path), eval_path=str(path), eval_size=2, min_pass_rate=0.2, max_pass_rate=0.7)
    )
    assert sorted(e.meta["pass_rate"] for e in task.train) == [0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    assert len(task.eval) == 2  # the held-out set is never filtered
    with pytest.raises(DataError, match="no training rows left"):
        build_task(TaskConfig(name=str(path), eval_path=str(path), min_pass_rate=0.95, max_pass_rate=0.99))
    bad = write(tmp_path / "badrate.jsonl", [{"question": "q", "answer": "1", "pass_rate": "high"}])
    with pytest.raises(DataError, match=":1: 'pass_rate' must be a number"):
        build_task(TaskConfig(name=str(bad)))


def test_bad_field_mapping_key_is_a_config_error():
    from thinkrl.config import build_config

    with pytest.raises(ConfigError, match="task.fields: unknown key"):
        build_config(overrides=["task.fields.qestion=problem"])
