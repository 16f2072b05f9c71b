"""``thinkrl eval thinking_budget=...`` on tiny-random with a three-question file task."""

import json

import pytest

from thinkrl.cli import main
from thinkrl.config import ConfigError
from thinkrl.eval.budget import format_budget_table, parse_budgets
from thinkrl.rollout.thinking import CLOSING_PHRASE


@pytest.fixture
def files(tmp_path):
    rows = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(8)]
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    return train, held


def test_eval_over_budgets_prints_a_table_writes_json_and_a_curve(files, tmp_path, capsys):
    """The default chat template starts the answer with a <think> prefill, so every response
    thinks from its first token: at budget B it holds at most B thinking tokens, then the
    closing phrase (unless it ended first)."""
    train, held = files
    out = tmp_path / "out" / "eval.json"
    rc = main(
        [
            "eval",
            "model=tiny-random",
            f"task={train}",
            f"task.eval_path={held}",
            "n=3",
            "dtype=fp32",
            "eval.max_new_tokens=140",
            "thinking_budget=4,16",
            f"output={out}",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["thinking_budgets"] == [4, 16]
    for B in (4, 16):
        res = data["results"]["tiny-random"][str(B)]
        s = res["summary"]
        assert s["thinking_budget"] == B and s["n"] == 3
        assert any(
            line.split()[:2] == ["tiny-random", str(B)] and f"{s['accuracy']:.3f}" in line
            for line in printed.splitlines()
        )
        closed = 0
        for rec in res["records"]:
            text = rec["completion"]
            assert text.startswith("<think>")
            if CLOSING_PHRASE in text:
                closed += 1
                # byte tokens: each decodes to at most one character (a broken UTF-8 byte to one
                # U+FFFD, a special token to none), so a thought of B tokens has <= B characters
                thought = text[len("<think>") : text.index(CLOSING_PHRASE)]
                assert len(thought) <= B
                assert text.count(CLOSING_PHRASE) == 1
        assert s["forced_rate"] == closed / 3 and closed >= 1
    png = out.parent / "budget_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out}" in printed and f"wrote {png}" in printed


def test_a_bad_budget_list_is_one_error_line(files, capsys):
    train, _ = files
    assert main(["eval", "model=tiny-random", f"task={train}", "thinking_budget=32,-5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "thinkrl: error: thinking_budget must be a comma-separated list"
    )


def test_parse_budgets_and_the_table():
    assert parse_budgets("32, 64,128") == [32, 64, 128]
    for bad in ("", "a,b", "3.5", "8,8"):
        with pytest.raises(ConfigError, match="thinking_budget"):
            parse_budgets(bad)
    table = format_budget_table(
        [
            (
                "m",
                {
                    8: {
                        "accuracy": 0.25,
                        "response_len_mean": 12.5,
                        "forced_rate": 1.0,
                        "format_rate": 0.5,
                        "n": 4,
                    }
                },
            )
        ]
    )
    assert table.splitlines()[0].split() == [
        "model",
        "thinking_budget",
        "accuracy",
        "response_len_mean",
        "forced_rate",
        "format_rate",
        "n",
    ]
    assert table.splitlines()[2].split() == ["m", "8", "0.250", "12.500", "1.000", "0.500", "4"]


def test_a_wait_phrase_is_found_among_a_completions_forced_runs():
    from thinkrl.eval import _forced_run

    wait = [7, 8]
    assert _forced_run([1, 7, 8, 2, 3], [False, True, True, False, False], wait)
    assert not _forced_run([1, 7, 8, 2], [False, False, True, False], wait)  # the 7 was sampled
    assert _forced_run(
        [1, 7, 8, 5, 6], [False, True, True, True, True], wait
    )  # Wait, then the closing phrase
    assert not _forced_run(
        [5, 6, 7, 8], [True, True, True, True], wait
    )  # a closing phrase that contains 7, 8
