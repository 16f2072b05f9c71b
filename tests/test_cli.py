"""End to end: ``thinkrl train`` and ``thinkrl eval`` on tiny-random, in-process and as a subprocess."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from thinkrl.cli import main

TINY_RUN = [
    "model=tiny-random",
    "rollout.max_new_tokens=8",
    "rollout.prompts_per_step=2",
    "rollout.group_size=4",
    "eval.n=4",
    "progress=false",
    "task.train_size=50",
    "task.eval_size=8",
]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def train(*args):
    return main(["train", *TINY_RUN, *args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, byte_sum_reward):
    """R: 2 steps with a checkpoint after step 1, final/ deleted, resumed to 3 steps.
    U: the same 3 steps uninterrupted. The byte-sum reward gives non-zero advantages, so weights move."""
    root = tmp_path_factory.mktemp("runs")
    # fp32 and the short plain template only make generation faster; the subprocess run keeps the defaults
    common = [
        "plot=false",
        "dtype=fp32",
        "task.template=plain",
        "optim.lr=0.001",
        f"rewards.{byte_sum_reward}=1.0",
    ]
    r, u = root / "R", root / "U"
    assert train(f"output_dir={r}", "max_steps=2", "save_every=1", *common) == 0
    first_steps = [m["step"] for m in read_jsonl(r / "metrics.jsonl")]
    shutil.rmtree(r / "final")
    assert train(f"output_dir={r}", "max_steps=3", "save_every=1", "resume=true", *common) == 0
    assert train(f"output_dir={u}", "max_steps=3", *common) == 0
    return {"R": r, "U": u, "first_steps": first_steps, "common": common}


def test_resume_logs_each_step_once(runs):
    assert runs["first_steps"] == [1, 2]
    assert [m["step"] for m in read_jsonl(runs["R"] / "metrics.jsonl")] == [1, 2, 3]
    assert [s["step"] for s in read_jsonl(runs["R"] / "samples.jsonl")] == [
        1,
        1,
        1,
        1,
        2,
        2,
        2,
        2,
        3,
        3,
        3,
        3,
    ]
    # checkpoints after steps 1 and 2 (the last step is written to final/ instead)
    assert sorted(p.name for p in (runs["R"] / "checkpoints").iterdir()) == ["latest", "step-1", "step-2"]


def test_resume_matches_an_uninterrupted_run(runs, tiny_pair):
    resumed = read_jsonl(runs["R"] / "metrics.jsonl")
    straight = read_jsonl(runs["U"] / "metrics.jsonl")
    # the restored RNG, optimizer and task position make step 3 bit-identical on the same machine
    for key in ("reward", "loss", "grad_norm", "entropy", "trained_seqs", "response_len_mean"):
        assert resumed[2][key] == straight[2][key], key
    assert resumed[2]["trained_seqs"] > 0  # the step trained on something
    wr = load_file(runs["R"] / "final" / "model.safetensors")
    wu = load_file(runs["U"] / "final" / "model.safetensors")
    assert wr.keys() == wu.keys()
    assert all(torch.equal(wr[k], wu[k]) for k in wr)
    initial = dict(tiny_pair[0].named_parameters())
    assert any(not torch.equal(wr[k], initial[k]) for k in wr if k in initial)  # and training moved them


def test_resume_drops_stale_evals(runs):
    assert [(e["step"], e["label"]) for e in read_jsonl(runs["R"] / "evals.jsonl")] == [
        (0, "before"),
        (3, "after"),
    ]


def test_rerun_into_a_folder_with_checkpoints_needs_resume(runs, capsys):
    before = (runs["R"] / "metrics.jsonl").read_text()
    assert train(f"output_dir={runs['R']}", "max_steps=3", *runs["common"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("thinkrl: error:")
    assert "already holds a run with checkpoints" in err[0] and "resume=true" in err[0]
    assert (runs["R"] / "metrics.jsonl").read_text() == before  # nothing was touched


@pytest.fixture(scope="module")
def subprocess_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sub") / "run"
    exe = Path(sys.executable).parent / "thinkrl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [str(exe), "train", *TINY_RUN, "max_steps=2", f"output_dir={out}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    return out, proc


def test_train_subprocess_writes_a_run_folder(subprocess_run):
    from transformers import AutoModelForCausalLM

    out, proc = subprocess_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    metrics = read_jsonl(out / "metrics.jsonl")
    assert len(metrics) == 2 and [m["step"] for m in metrics] == [1, 2]
    for m in metrics:  # default rewards: 1.0 * accuracy + 0.1 * format, averaged over the 8 samples
        assert m["reward"] == pytest.approx(m["reward/accuracy"] + 0.1 * m["reward/format"], abs=1e-6)
        assert m["lr"] == pytest.approx(1e-5, abs=1e-12) and m["response_len_max"] <= 8
    for name in ("config.yaml", "samples.jsonl", "curves.png", "eval_before.json", "eval_after.json"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.vocab_size == 259
    assert f"run folder: {out}" in proc.stdout


def test_eval_command_writes_json(subprocess_run, tmp_path, capsys):
    out, proc = subprocess_run
    assert proc.returncode == 0
    dest = tmp_path / "eval.json"
    assert main(["eval", f"model={out / 'final'}", "n=4", f"output={dest}"]) == 0
    data = json.loads(dest.read_text())
    res = data["results"][str(out / "final")]
    assert data["task"] == "chain_sum"
    assert res["summary"]["n"] == 4 and len(res["records"]) == 4
    # it picked up the run's task config: the same held-out questions and the same greedy completions
    after = json.loads((out / "eval_after.json").read_text())["records"]
    assert [r["question"] for r in res["records"]] == [r["question"] for r in after]
    assert [r["completion"] for r in res["records"]] == [r["completion"] for r in after]
    assert f"wrote {dest}" in capsys.readouterr().out


def test_resume_of_a_finished_run_without_checkpoints_fails(subprocess_run, capsys):
    out, _ = subprocess_run
    assert train(f"output_dir={out}", "max_steps=3", "resume=true") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"thinkrl: error: {out} has a finished run (final/) and no step checkpoint to resume from"]


def write_bad_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "1 + 1", "answer": "2"}\n{"question": oops}\n')
    return path


@pytest.mark.parametrize(
    "args,message",
    [
        (lambda d: ["model=" + str(d / "no-such-model")], "model path {d}/no-such-model does not exist"),
        (lambda d: ["task.name=nope_task"], "unknown task 'nope_task'"),
        (lambda d: [f"task.name={write_bad_jsonl(d)}"], "{d}/bad.jsonl:2: not valid JSON"),
        (lambda d: ["mdoel=tiny-random"], "unknown config key 'mdoel'. Valid keys here: model, output_dir"),
        (lambda d: ["rollout.group_size=1"], "rollout.group_size must be >= 2"),
    ],
)
def test_bad_inputs_give_one_line_errors(tmp_path, capsys, args, message):
    rc = main(
        ["train", f"output_dir={tmp_path / 'run'}", "task.train_size=20", "task.eval_size=4", *args(tmp_path)]
    )
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("thinkrl: error: "), err
    assert message.format(d=tmp_path) in lines[0]
    assert "Traceback" not in err


def test_eval_without_model_is_an_error(capsys):
    assert main(["eval", "n=4"]) == 2
    assert capsys.readouterr().err.startswith("thinkrl: error: thinkrl eval needs model=PATH")


def test_no_command_prints_usage(capsys):
    assert main([]) == 2
    assert "thinkrl train" in capsys.readouterr().out


def test_small_jsonl_file_does_not_crash(tmp_path, capsys):
    path = tmp_path / "small.jsonl"
    path.write_text(
        "".join(json.dumps({"question": f"{i} + {i}", "answer": str(2 * i)}) + "\n" for i in range(4))
    )
    rc = train(f"output_dir={tmp_path / 'run'}", f"task.name={path}", "max_steps=1", "plot=false")
    if rc != 0:
        assert rc == 2 and capsys.readouterr().err.startswith("thinkrl: error:")
