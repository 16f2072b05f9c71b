import importlib.machinery
import sys
import types

import pytest

from thinkrl.cli import main

RUN = [
    "model=tiny-random",
    "rollout.max_new_tokens=8",
    "rollout.prompts_per_step=2",
    "rollout.group_size=2",
    "progress=false",
    "task.train_size=20",
    "task.eval_size=4",
    "eval.before=false",
    "eval.after=false",
    "plot=false",
    "save_every=0",
    "max_steps=2",
]


def test_wandb_gets_every_step_numbers_only_and_is_finished(tmp_path, monkeypatch):
    calls = {"init": [], "log": [], "finish": 0}

    class Run:
        def log(self, metrics, step):
            calls["log"].append((step, metrics))

        def finish(self):
            calls["finish"] += 1

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # libraries probe for it with find_spec
    fake.init = lambda **kw: calls["init"].append(kw) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert (
        main(
            [
                "train",
                *RUN,
                f"output_dir={tmp_path / 'run'}",
                "log.backends=[jsonl, wandb]",
                "log.project=demo",
            ]
        )
        == 0
    )
    assert len(calls["init"]) == 1 and calls["init"][0]["project"] == "demo"
    assert calls["init"][0]["config"]["log"]["backends"] == ["jsonl", "wandb"]
    assert [s for s, _ in calls["log"]] == [1, 2] and calls["finish"] == 1
    for _, m in calls["log"]:
        assert "reward" in m and all(isinstance(v, float) for v in m.values()) and "step" not in m
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 2  # jsonl is always written


@pytest.mark.parametrize(
    "backend,message",
    [
        (
            "tensorboard",
            "log.backends: 'tensorboard' needs the tensorboard package; install it with: "
            "pip install 'thinkrl[tensorboard]'",
        ),
        ("mlflow", "log.backends: 'mlflow' unknown; choose from: jsonl, tensorboard, wandb, trackio"),
    ],
)
def test_a_missing_or_unknown_tracker_is_one_clear_error(tmp_path, capsys, monkeypatch, backend, message):
    pytest.importorskip("torch")
    if backend == "tensorboard":
        monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed, wherever it is
    assert main(["train", *RUN, f"output_dir={tmp_path / 'run'}", f"log.backends=[{backend}]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"thinkrl: error: {message}"]
