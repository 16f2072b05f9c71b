"""Fault injection: ``kill -9`` a real ``thinkrl train`` process at seeded random moments, in
generation, in training and while saving, four times, resuming it each time, and compare the end with an
uninterrupted run: the same final weights, bit for bit, and the same metrics.jsonl, each step
once. Marked ``faults`` (``pytest -m faults``); it starts six training processes (~35 s)."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS = 6
ARGS = [
    "train",
    "model=tiny-random",
    "rollout.max_new_tokens=8",
    "rollout.prompts_per_step=2",
    "rollout.group_size=4",
    "progress=false",
    "task.train_size=50",
    "task.eval_size=8",
    "plot=false",
    "dtype=fp32",
    "threads=1",
    "task.template=plain",
    "task.prefill=",
    "optim.lr=0.001",
    "eval.before=false",
    "eval.after=false",
    "save_every=1",
    "keep_checkpoints=2",
    "rewards.byte_sum=1.0",
    f"max_steps={MAX_STEPS}",
]
# The CLI with a reward that varies between random completions (so every step moves the weights),
# registered in the child process itself.
DRIVER = """
import sys
from thinkrl.rewards import REWARDS

REWARDS.register("byte_sum")(lambda completion, example: (sum(map(ord, completion)) % 7) / 6)
from thinkrl.cli import main

sys.exit(main(sys.argv[1:]))
"""
TIMINGS = ("time_generate", "time_score", "time_train", "step_time", "tokens_per_s")


def kill_schedule(seed: int) -> list[tuple[str, int]]:
    """Four (fault point, step) pairs, one at each point, in random order at random increasing
    steps: in generation, in training (gradients computed, not applied) and twice while saving
    (``save``: the folder written aside; ``commit``: renamed into place, ``latest`` not yet
    updated; at the last step both hit ``final/``). Increasing steps make each kill land in the
    run that resumes after the one before."""
    rng = random.Random(seed)
    phases = ["generate", "train", "save", "commit"]
    rng.shuffle(phases)
    return list(zip(phases, sorted(rng.sample(range(2, MAX_STEPS + 1), len(phases)))))


def thinkrl(
    tmp_path: Path, out: Path, *extra: str, failpoint: str | None = None
) -> subprocess.CompletedProcess:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("THINKRL_FAILPOINT", None)
    if failpoint:
        env["THINKRL_FAILPOINT"] = failpoint
    return subprocess.run(
        [sys.executable, str(driver), *ARGS, f"output_dir={out}", *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.mark.faults
@pytest.mark.parametrize("seed", [0])
def test_kill_9_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path, seed):
    schedule = kill_schedule(seed)
    r, u = tmp_path / "R", tmp_path / "U"
    for i, (phase, step) in enumerate(schedule):
        proc = thinkrl(tmp_path, r, *(["resume=true"] if i else []), failpoint=f"{phase}:{step}:KILL")
        assert proc.returncode == -signal.SIGKILL, (schedule, i, proc.stderr[-2000:])  # it died where told
    proc = thinkrl(tmp_path, r, "resume=true")
    assert proc.returncode == 0, (schedule, proc.stderr[-2000:])
    proc = thinkrl(tmp_path, u)
    assert proc.returncode == 0, proc.stderr[-2000:]

    wr, wu = load_file(r / "final" / "model.safetensors"), load_file(u / "final" / "model.safetensors")
    assert wr.keys() == wu.keys() and all(torch.equal(wr[k], wu[k]) for k in wr), schedule
    mr, mu = read_jsonl(r / "metrics.jsonl"), read_jsonl(u / "metrics.jsonl")
    assert [m["step"] for m in mr] == list(range(1, MAX_STEPS + 1)), schedule
    strip = [{k: v for k, v in m.items() if k not in TIMINGS} for m in (*mr, *mu)]
    assert strip[:MAX_STEPS] == strip[MAX_STEPS:], schedule
    assert [s["step"] for s in read_jsonl(r / "samples.jsonl")] == [
        s["step"] for s in read_jsonl(u / "samples.jsonl")
    ]
    assert not any(p.name.endswith((".tmp", ".old", ".del")) for p in r.rglob("*")), schedule
