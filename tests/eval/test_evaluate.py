"""evaluate() and the difficulty labels on a scripted engine: a real Engine (the Protocol's
``generate``) whose completions are fixed, so every number below is worked by hand."""

import json

import pytest

from thinkrl.config import TaskConfig
from thinkrl.eval import evaluate, format_table
from thinkrl.rollout import Rollout
from thinkrl.sampling.difficulty import apply_pass_rates, estimate_pass_rates, write_rows
from thinkrl.tasks import Example, Task, answers_match

T = "<think> {} </think> <answer> {} </answer>"
SCRIPT = {  # question -> (gold answer, 4 completions)
    "q1": ("5", [T.format("a", 5), T.format("wait", 6), T.format("b", 6), "no format 5"]),
    "q2": (
        "7",
        [T.format("x", 8), T.format("y", 7), T.format("z", "7.0"), T.format("Wait, let me verify", 8)],
    ),
    "q3": ("1", ["<answer> 1 </answer>", T.format("t", 1), T.format("t", 3), T.format("t", 1)]),
    "q4": ("9", [T.format("t", 2)] * 4),
}


class ScriptedEngine:
    def generate_text(self, prompts, n, params):
        texts = [SCRIPT[p.strip()][1][j] for p in prompts for j in range(n)]
        return Rollout(
            prompt_ids=[[1]] * len(texts),
            completion_ids=[[0] * len(t.split()) for t in texts],
            texts=texts,
            truncated=[t == "no format 5" for t in texts],
        )


class ListTask(Task):
    name = "scripted"

    def check(self, pred, ex):
        return answers_match(pred, ex.answer)


@pytest.fixture
def task():
    rows = [Example(question=q, answer=a) for q, (a, _) in SCRIPT.items()]
    t = ListTask(rows, rows, seed=0)
    for ex in rows:
        ex.source = t
    return t


def test_evaluate_with_k_samples(task):
    res = evaluate(
        ScriptedEngine(),
        None,
        task.eval,
        TaskConfig(template="plain", prefill=""),
        max_new_tokens=8,
        temperature=1.0,
        samples=4,
        reflection_words=["wait", "let me verify"],
    )
    s = res["summary"]
    # right samples: q1 1 (s0), q2 2 (s1, s2: "7.0" == 7), q3 3 (s0 has no <think> but the answer counts), q4 0
    assert s["accuracy"] == pytest.approx(6 / 16, abs=1e-12)  # pass@1 averaged over the 4 samples
    # pass@4 = 1 - C(4 - c, 4) / C(4, 4): 1 whenever c >= 1, so q1..q3 -> 3 / 4
    assert s["pass@4"] == pytest.approx(0.75, abs=1e-12)
    # maj@4: q1 "6" beats "5" 2:1 (wrong); q2 "8" and "7" tie 2:2 and "8" was given first (wrong);
    # q3 "1" wins 3:1 (right); q4 "2" (wrong) -> 1 / 4
    assert s["maj@4"] == 0.25
    assert [r["maj_correct"] for r in res["records"]] == [False, False, True, False]
    assert s["format_rate"] == pytest.approx(14 / 16, abs=1e-12)  # q1 s3 and q3 s0 lack the format
    # reflection: q1 s1 has "wait" (1), q2 s3 has "Wait" and "let me verify" (2): 2 of 16 responses, 3 phrases
    assert s["reflection_rate"] == pytest.approx(2 / 16, abs=1e-12)
    assert s["reflection_per_response"] == pytest.approx(3 / 16, abs=1e-12)
    assert s["truncation_rate"] == pytest.approx(1 / 16, abs=1e-12)
    assert (
        s["response_len_max"] == 9
    )  # the longest, "<think> Wait, let me verify </think> <answer> 8 </answer>": 9 words
    table = format_table([("a", s), ("b", s)])
    assert "pass@4" in table.splitlines()[0] and "maj@4" in table.splitlines()[0]
    assert len(table.splitlines()) == 4


def test_difficulty_labels_round_trip_and_filter(task, tmp_path):
    rows = estimate_pass_rates(
        ScriptedEngine(), None, task.train, TaskConfig(template="plain", prefill=""), k=4, max_new_tokens=8
    )
    assert [(r["question"], r["correct"], r["pass_rate"]) for r in rows] == [
        ("q1", 1, 0.25),
        ("q2", 2, 0.5),
        ("q3", 3, 0.75),
        ("q4", 0, 0.0),
    ]
    path = tmp_path / "labels.jsonl"
    write_rows(rows, path)
    assert json.loads(path.read_text().splitlines()[1])["pass_rate"] == 0.5
    # Kimi's filter: drop the too hard (q4: 0) and the too easy (q3: 0.75 > 0.6)
    apply_pass_rates(task, TaskConfig(pass_rates=str(path), min_pass_rate=0.1, max_pass_rate=0.6))
    assert [ex.question for ex in task.train] == ["q1", "q2"]
    assert [ex.meta["pass_rate"] for ex in task.eval] == [0.25, 0.5, 0.75, 0.0]  # labelled, not filtered


def test_eval_command_with_k_samples_side_by_side(tmp_path, capsys):
    from thinkrl.cli import main

    dest = tmp_path / "eval.json"
    args = [
        "eval",
        "model=tiny-random,tiny-random",
        "k=3",
        "n=2",
        "task.train_size=10",
        "task.eval_size=4",
        "rollout.max_new_tokens=4",
        "task.template=plain",
        "task.prefill=",
        "dtype=fp32",
        "eval.temperature=1.0",
        f"output={dest}",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "task: chain_sum  (held-out, 3 samples at temperature 1)"
    assert out[1].split()[:4] == ["model", "accuracy", "pass@3", "maj@3"]
    assert sum(line.startswith("tiny-random") for line in out) == 2  # one row per model
    data = json.loads(dest.read_text())
    assert data["samples"] == 3 and data["temperature"] == 1.0
    summary = data["results"]["tiny-random"]["summary"]
    assert summary["n"] == 2 and summary["samples"] == 3
    assert len(data["results"]["tiny-random"]["records"][0]["samples"]) == 3
