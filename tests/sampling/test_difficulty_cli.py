import json

from thinkrl.cli import main

TINY = [
    "rollout.max_new_tokens=4",
    "task.train_size=20",
    "task.eval_size=4",
    "task.template=plain",
    "dtype=fp32",
]


def test_difficulty_command_writes_pass_rates_that_training_can_filter_on(tmp_path, capsys):
    out = tmp_path / "labels.jsonl"
    assert (
        main(["difficulty", "model=tiny-random", "task=chain_sum", "k=3", "n=5", f"output={out}", *TINY]) == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and all(r["k"] == 3 and r["pass_rate"] == r["correct"] / 3 for r in rows)
    assert {"question", "answer", "task", "pass_rate"} <= set(rows[0])
    assert f"wrote {out}: 5 questions" in capsys.readouterr().out
    # the 5 labelled rows are joined on the question (the other 15 have no label and are skipped);
    # tiny-random never answers right, so every pass rate is 0 and a window above 0 keeps nothing
    assert (
        main(
            [
                "train",
                "model=tiny-random",
                *TINY,
                f"output_dir={tmp_path / 'run'}",
                f"task.pass_rates={out}",
                "task.min_pass_rate=0.1",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "thinkrl: error: task 'chain_sum': no training rows left after skipping those with a pass "
        "rate outside [0.1, 1.0]"
    ]


def test_difficulty_command_needs_an_output(capsys):
    assert main(["difficulty", "model=tiny-random", "k=2"]) == 2
    assert capsys.readouterr().err.strip() == (
        "thinkrl: error: thinkrl difficulty needs one model=PATH and output=FILE.jsonl"
    )
    assert main(["difficulty", "model=tiny-random", "k=0", "output=x.jsonl"]) == 2
    assert "k must be a positive integer" in capsys.readouterr().err
