"""Ctrl-C (SIGINT) and SIGTERM at each phase of a step, and a run whose rewards turn NaN, on tiny-random.

U is a 4-step run with a checkpoint after every step; each interrupted run R is stopped by a
signal that a fault point (thinkrl/trainer/interrupt.py) sends this very process during step 2,
then resumed. What R saved must be step 2 as U saw it, bit for bit, and the resumed run must
end where U ends."""

import json
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from thinkrl.cli import main

TINY = [
    "model=tiny-random",
    "rollout.max_new_tokens=8",
    "rollout.prompts_per_step=2",
    "rollout.group_size=4",
    "progress=false",
    "task.train_size=50",
    "task.eval_size=8",
    "plot=false",
    "dtype=fp32",
    "task.template=plain",
    "task.prefill=",
    "optim.lr=0.001",
    "eval.before=false",
    "eval.after=false",
    "save_every=1",
    "keep_checkpoints=0",
]
TIMINGS = ("time_generate", "time_score", "time_train", "step_time", "tokens_per_s")


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def untimed(metrics):
    return [{k: v for k, v in m.items() if k not in TIMINGS} for m in metrics]


def same_weights(a, b) -> bool:
    wa, wb = load_file(Path(a) / "model.safetensors"), load_file(Path(b) / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def errors(capsys):
    return [x for x in capsys.readouterr().err.strip().splitlines() if x.startswith("thinkrl:")]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, byte_sum_reward):
    """U: 4 steps uninterrupted, every step checkpointed (the last one to final/)."""
    args = [*TINY, f"rewards.{byte_sum_reward}=1.0", "max_steps=4"]
    u = tmp_path_factory.mktemp("straight") / "U"
    assert main(["train", *args, f"output_dir={u}"]) == 0
    assert not same_weights(
        u / "checkpoints" / "step-1", u / "checkpoints" / "step-2"
    )  # training moves weights
    return u, args


@pytest.mark.parametrize(
    "phase,sig,code",
    [("generate", "INT", 130), ("train", "INT", 130), ("save", "INT", 130), ("train", "TERM", 143)],
)
def test_a_signal_saves_the_step_it_came_in_and_resume_is_exact(
    straight, tmp_path, monkeypatch, capsys, phase, sig, code
):
    u, args = straight
    r = tmp_path / "R"
    monkeypatch.setenv("THINKRL_FAILPOINT", f"{phase}:2:{sig}")
    assert main(["train", *args, f"output_dir={r}"]) == code
    monkeypatch.delenv("THINKRL_FAILPOINT")
    assert errors(capsys) == [
        f"thinkrl: interrupted: SIG{sig} during step 2: saved checkpoints/step-2; continue with resume=true"
    ]
    assert sorted(p.name for p in (r / "checkpoints").iterdir()) == ["latest", "step-1", "step-2"]
    assert not (r / "final").exists()
    # step 2 finished and was saved under its own name: the weights after exactly two updates
    assert same_weights(r / "checkpoints" / "step-2", u / "checkpoints" / "step-2")
    assert [m["step"] for m in read_jsonl(r / "metrics.jsonl")] == [1, 2]
    assert main(["train", *args, f"output_dir={r}", "resume=true"]) == 0
    assert same_weights(r / "final", u / "final")
    assert untimed(read_jsonl(r / "metrics.jsonl")) == untimed(read_jsonl(u / "metrics.jsonl"))


def test_a_second_sigint_aborts_without_saving(straight, tmp_path, monkeypatch, capsys):
    """Two Ctrl-C during step 2's update: nothing of step 2 is saved; step 1 stays the last checkpoint."""
    import os
    import signal

    import thinkrl.trainer.rl as rl

    u, args = straight
    r = tmp_path / "R"

    def twice(name, step):
        if (name, step) == ("train", 2):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(rl, "failpoint", twice)
    assert main(["train", *args, f"output_dir={r}"]) == 130
    monkeypatch.undo()
    assert errors(capsys) == ["thinkrl: interrupted: second SIGINT: aborted without saving"]
    assert sorted(p.name for p in (r / "checkpoints").iterdir()) == ["latest", "step-1"]
    assert same_weights(r / "checkpoints" / "step-1", u / "checkpoints" / "step-1")
    assert main(["train", *args, f"output_dir={r}", "resume=true"]) == 0
    assert same_weights(r / "final", u / "final")
    assert [m["step"] for m in read_jsonl(r / "metrics.jsonl")] == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def nan_from_step_3():
    """A reward like the byte-sum one for the first two steps (2 prompts x 4 samples each), NaN after."""
    from thinkrl.rewards import REWARDS

    name, calls = f"test_nan_{uuid.uuid4().hex[:8]}", [0]

    @REWARDS.register(name)
    def _reward(completion, example):
        calls[0] += 1
        return float("nan") if calls[0] > 16 else (sum(map(ord, completion)) % 7) / 6

    return name, calls


def test_nan_rewards_are_skipped_counted_and_stop_the_run(nan_from_step_3, tmp_path, capsys):
    name, calls = nan_from_step_3
    calls[0] = 0
    r = tmp_path / "R"
    rc = main(
        ["train", *TINY, f"rewards.{name}=1.0", "max_steps=10", "optim.max_bad_steps=3", f"output_dir={r}"]
    )
    assert rc == 2
    ck = r / "checkpoints"
    assert errors(capsys) == [
        "thinkrl: error: training stopped after 3 skipped updates in a row (step 3: nan_reward, step 4: nan_reward, "
        "step 5: nan_reward; optim.max_bad_steps=3): a reward returned NaN or infinity: fix that reward; the last "
        f"good checkpoint is {ck / 'step-4'}"
    ]
    m = read_jsonl(r / "metrics.jsonl")
    assert [x["step"] for x in m] == [1, 2, 3, 4, 5]
    assert [x["skipped"] for x in m] == [0, 0, 1, 1, 1] and [x["skipped_total"] for x in m] == [0, 0, 1, 2, 3]
    assert [x.get("skip_cause") for x in m] == [None, None, "nan_reward", "nan_reward", "nan_reward"]
    assert m[2]["reward"] is None and m[2]["trained_seqs"] == 0  # NaN is written as null
    # no step 5 checkpoint, no final/; the skipped steps left weights, optimizer and schedule as step 2 had them
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step-1", "step-2", "step-3", "step-4"]
    assert not (r / "final").exists()
    assert same_weights(ck / "step-4", ck / "step-2") and not same_weights(ck / "step-2", ck / "step-1")
    s2, s4 = (torch.load(ck / s / "trainer_state.pt", weights_only=True) for s in ("step-2", "step-4"))
    assert s4["scheduler"]["last_epoch"] == s2["scheduler"]["last_epoch"] == 2
    assert all(
        torch.equal(s2["optimizer"]["state"][i]["exp_avg"], s4["optimizer"]["state"][i]["exp_avg"])
        for i in s2["optimizer"]["state"]
    )
