"""A pipeline re-runs a stage whose resolved config changed (and every stage after it), says why,
and skips the stages whose config did not change."""

import json
import logging
from pathlib import Path

import yaml
from safetensors.torch import load_file

from thinkrl.cli import main

QUESTIONS = ["1 + 1", "0 + 2", "2 + 0", "3 - 1"]


def pipeline(tmp_path: Path, lr_a: float) -> Path:
    data = tmp_path / "sft.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": q, "completion": "<answer> 2 </answer>"}) + "\n" for q in QUESTIONS)
    )
    sft = {"kind": "sft", "data": str(data), "batch_size": 4, "progress": False}
    cfg = {
        "model": "tiny-random",
        "output_dir": str(tmp_path / "run"),
        "eval_n": 0,
        "dtype": "fp32",
        "task": {"template": "plain"},
        "stages": [{"name": "a", **sft, "max_steps": 2, "lr": lr_a}, {"name": "b", **sft, "max_steps": 1}],
    }
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(path: Path, caplog) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="thinkrl.pipeline.run"):
        assert main(["pipeline", str(path)]) == 0
    return [
        r.getMessage().split(": running in ")[0] for r in caplog.records if r.name == "thinkrl.pipeline.run"
    ]


def test_a_changed_stage_and_the_ones_after_it_run_again(tmp_path, caplog):
    out = tmp_path / "run"
    assert run(pipeline(tmp_path, 1e-3), caplog) == ["stage a (sft)", "stage b (sft)"]
    first = load_file(out / "01-a" / "final" / "model.safetensors")
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/stage.json")}

    # unchanged: both skipped, nothing rewritten
    assert run(pipeline(tmp_path, 1e-3), caplog) == [
        "stage a: done earlier with this config, skipped",
        "stage b: done earlier with this config, skipped",
    ]
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/stage.json")} == stamps

    # a's lr changed: a runs again, and so does b, whose own config is the same but whose input model is not
    assert run(pipeline(tmp_path, 2e-3), caplog) == [
        "stage a: its config changed since it ran (lr: 0.001 -> 0.002): running it again",
        "stage a (sft)",
        "stage b: an earlier stage changed since it ran: running it again",
        "stage b (sft)",
    ]
    again = load_file(out / "01-a" / "final" / "model.safetensors")
    assert any(not (first[k] == again[k]).all() for k in first)
    assert json.loads((out / "01-a" / "stage.json").read_text())["config"]["lr"] == 2e-3
    assert run(pipeline(tmp_path, 2e-3), caplog)[0] == "stage a: done earlier with this config, skipped"


def test_a_stage_started_with_another_config_starts_over(tmp_path, caplog):
    """A stage interrupted mid-way (stage.key, checkpoints, no stage.json) resumes only under its own
    key; under another one its folder is emptied first, so no checkpoint of the old config is resumed."""
    out = tmp_path / "run"
    run(pipeline(tmp_path, 1e-3), caplog)
    (out / "01-a" / "stage.json").unlink()  # as if killed after its checkpoints, before it finished
    (out / "01-a" / "checkpoints").mkdir()
    (out / "01-a" / "checkpoints" / "step-1").mkdir()  # any checkpoint here would be resumed
    lines = run(pipeline(tmp_path, 5e-3), caplog)
    assert lines[:2] == [
        "stage a: its config changed since it started (lr: 0.001 -> 0.005): starting it over",
        "stage a (sft)",
    ]
    assert not (out / "01-a" / "checkpoints" / "step-1").exists()


def test_an_interrupted_rl_stage_resumes_exactly(tmp_path, monkeypatch, byte_sum_reward):
    """Ctrl-C during step 2 of a pipeline's RL stage, then the pipeline again: the stage resumes from
    its step-2 checkpoint (same key) and ends with the weights of a pipeline run straight through."""

    def rl_pipeline(out: Path) -> Path:
        rl = {
            "name": "rl",
            "kind": "rl",
            "max_steps": 3,
            "save_every": 1,
            "plot": False,
            "progress": False,
            "eval": {"before": False, "after": False},
            "rewards": {byte_sum_reward: 1.0},
            "optim": {"lr": 1e-3},
            "rollout": {"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 8},
            "task": {"train_size": 50, "eval_size": 8, "prefill": ""},
        }
        cfg = {
            "model": "tiny-random",
            "output_dir": str(out),
            "eval_n": 0,
            "dtype": "fp32",
            "task": {"template": "plain"},
            "stages": [rl],
        }
        path = out.parent / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    straight, stopped = tmp_path / "U", tmp_path / "R"
    assert main(["pipeline", str(rl_pipeline(straight))]) == 0
    monkeypatch.setenv("THINKRL_FAILPOINT", "train:2:INT")
    assert main(["pipeline", str(rl_pipeline(stopped))]) == 130
    monkeypatch.delenv("THINKRL_FAILPOINT")
    stage = stopped / "01-rl"
    assert not (stage / "stage.json").exists() and (stage / "checkpoints" / "step-2").is_dir()
    assert main(["pipeline", str(rl_pipeline(stopped))]) == 0
    metrics = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    wr, wu = (load_file(d / "01-rl" / "final" / "model.safetensors") for d in (stopped, straight))
    assert all((wr[k] == wu[k]).all() for k in wr)
    first = load_file(straight / "01-rl" / "checkpoints" / "step-1" / "model.safetensors")
    assert any(not (first[k] == wu[k]).all() for k in wu)  # the stage trained
