"""The samplers inside the training loop, on tiny-random: dynamic sampling, prioritized and
curriculum order, their state across a resume, and the wall-time budget."""

import json
import shutil
from pathlib import Path

import pytest

from thinkrl.cli import main

TINY = [
    "model=tiny-random",
    "rollout.max_new_tokens=8",
    "rollout.prompts_per_step=2",
    "rollout.group_size=4",
    "eval.n=4",
    "progress=false",
    "task.train_size=50",
    "task.eval_size=8",
    "plot=false",
    "dtype=fp32",
    "task.template=plain",
    "task.prefill=",
    "optim.lr=0.001",
]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, byte_sum_reward):
    """R: prioritized + dynamic sampling, 2 steps with checkpoints, final/ deleted, resumed to 3.
    U: the same 3 steps uninterrupted."""
    root = tmp_path_factory.mktemp("sampling")
    common = [
        *TINY,
        f"rewards.{byte_sum_reward}=1.0",
        "sampling.order=prioritized",
        "sampling.dynamic=true",
        "sampling.max_rounds=2",
    ]
    r, u = root / "R", root / "U"
    assert main(["train", *common, f"output_dir={r}", "max_steps=2", "save_every=1"]) == 0
    shutil.rmtree(r / "final")
    assert main(["train", *common, f"output_dir={r}", "max_steps=3", "save_every=1", "resume=true"]) == 0
    assert main(["train", *common, f"output_dir={u}", "max_steps=3"]) == 0
    return r, u


def test_dynamic_sampling_in_the_loop(runs):
    for m in read_jsonl(runs[1] / "metrics.jsonl"):
        assert 0 <= m["dynamic_rounds"] <= 2
        assert m["dynamic_generated_groups"] == m["generated_seqs"] // 4 >= 2
        assert m["trained_seqs"] == 4 * m["dynamic_kept_groups"]  # every kept group is trained on
        assert "reflection_rate" in m and "reflection_per_response" in m


def test_sampler_state_survives_a_resume(runs):
    import torch

    state = torch.load(runs[0] / "checkpoints" / "step-2" / "trainer_state.pt", weights_only=True)
    assert len(state["sampler"]["success"]) > 0  # the prioritized sampler's success table was saved
    resumed, straight = read_jsonl(runs[0] / "metrics.jsonl"), read_jsonl(runs[1] / "metrics.jsonl")
    assert [m["step"] for m in resumed] == [1, 2, 3]
    for key in ("reward", "dynamic_generated_groups", "dynamic_kept_groups", "loss", "response_len_mean"):
        assert resumed[2][key] == straight[2][key], key
    a = [s["prompt"] for s in read_jsonl(runs[0] / "samples.jsonl") if s["step"] == 3]
    b = [s["prompt"] for s in read_jsonl(runs[1] / "samples.jsonl") if s["step"] == 3]
    assert a == b  # the same prompts were drawn after the resume


def test_max_minutes_stops_early_and_still_saves_and_evaluates(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, f"output_dir={out}", "max_steps=50", "max_minutes=0.0001"]) == 0
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1]  # 6 ms: one step, then stop
    assert (out / "final" / "trainer_state.pt").is_file()
    assert [(e["step"], e["label"]) for e in read_jsonl(out / "evals.jsonl")] == [(0, "before"), (1, "after")]


def test_curriculum_levels_in_the_loop(tmp_path):
    from thinkrl.config import TaskConfig
    from thinkrl.tasks import build_task

    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *TINY,
                f"output_dir={out}",
                "max_steps=2",
                "task.levels=[0, 3]",
                "sampling.order=curriculum",
                "log_samples=8",
                "eval.before=false",
            ]
        )
        == 0
    )
    task = build_task(TaskConfig(name="chain_sum", params={}, levels=[0, 3], train_size=50, eval_size=8))
    level = {ex.question + "\n": ex.meta["level"] for ex in task.train}  # the plain template adds "\n"
    drawn = {(s["step"], level[s["prompt"]]) for s in read_jsonl(out / "samples.jsonl")}
    # horizon 2 steps x 2 prompts = 4 draws over 50 rows (25 per level) take ranks 0, 12, 25, 37:
    # step 1 sees two level-0 prompts, step 2 two level-3 prompts
    assert drawn == {(1, 0), (2, 3)}


@pytest.mark.parametrize(
    "content,message",
    [
        ("q,a\n1+1,2\n", "bad.csv:2: no 'question' field (the row has: q, a)"),
        ("question,answer\n", "bad.csv holds no usable rows"),
        ("", "bad.csv holds no usable rows"),
    ],
)
def test_bad_csv_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    assert main(["train", *TINY, f"output_dir={tmp_path / 'run'}", f"task.name={path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("thinkrl: error: ") and message in err[0], err
