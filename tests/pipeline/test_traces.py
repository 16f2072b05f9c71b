"""Written-out long chains of thought (the long2short recipe's long-CoT SFT set)."""

import json

import pytest

from thinkrl.config import TaskConfig
from thinkrl.pipeline.traces import TracesConfig, parse_terms, worked_solution, write_traces
from thinkrl.rewards import RewardModel
from thinkrl.tasks import DataError, build_task


def test_parse_terms_reads_the_trailing_expression():
    assert parse_terms("State the final answer to the following arithmetic problem: 36 - 38 =") == [36, -38]
    assert parse_terms("What is 5 + 7 - 20?") == [5, 7, -20]
    assert parse_terms("x: -4 + 9 =") == [-4, 9]
    assert parse_terms("How many legs does a cat have?") is None


def test_worked_solution_by_hand():
    assert worked_solution([67, 39], 0) == " 67 + 30 = 97, and 97 + 9 = 106. </think> <answer> 106 </answer>"
    assert worked_solution([36, -38], 0) == (
        " 38 is more than 36, so the result is negative: 38 - 36 = 2, "
        "so 36 - 38 = -2. </think> <answer> -2 </answer>"
    )
    assert worked_solution([86, -66], 1) == (
        " 86 - 60 = 26, and 26 - 6 = 20. Wait, let me re-check: "
        "20 + 66 = 86, which matches. Yes, 20 is right. </think> <answer> 20 </answer>"
    )
    three = worked_solution([5, 7, -20], 2)
    assert three.startswith(" 5 + 7 = 12. 20 is more than 12") and "-20 + 7 + 5 = -8" in three
    assert three.endswith("<answer> -8 </answer>")


def test_every_written_solution_is_verified_correct_and_well_formed(tmp_path):
    cfg = TracesConfig(output=str(tmp_path / "t.jsonl"), prompts=300, min_rechecks=1, max_rechecks=3)
    stats = write_traces(cfg)
    rows = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert stats["rows"] == len(rows) == 300 and stats["skipped"] == {
        "not an expression": 0,
        "answer disagrees": 0,
    }
    assert {r["rechecks"] for r in rows} == {1, 2, 3} and 1.5 < stats["rechecks_mean"] < 2.5
    rm = RewardModel({"accuracy": 1.0, "format": 1.0})
    by_q = {ex.question: ex for ex in build_task(TaskConfig()).train}
    totals, parts = rm.score([r["completion"] for r in rows], [by_q[r["prompt"]] for r in rows])
    assert parts["accuracy"] == [1.0] * 300 and parts["format"] == [1.0] * 300


def test_non_arithmetic_rows_are_counted_and_none_is_one_error(tmp_path):
    task = tmp_path / "q.jsonl"
    task.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"question": "2 + 3 =", "answer": "5"},
                {"question": "name a colour", "answer": "red"},
                {"question": "4 - 1 =", "answer": "2"},
            ]
        )
    )
    stats = write_traces(
        TracesConfig(output=str(tmp_path / "t.jsonl"), task=TaskConfig(name=str(task), eval_size=0))
    )
    assert stats["rows"] == 1 and stats["skipped"] == {"not an expression": 1, "answer disagrees": 1}
    task.write_text(
        "".join(json.dumps({"question": f"name colour {i}", "answer": "red"}) + "\n" for i in range(4))
    )
    with pytest.raises(DataError, match="integer expression"):
        write_traces(
            TracesConfig(output=str(tmp_path / "u.jsonl"), task=TaskConfig(name=str(task), eval_size=0))
        )
