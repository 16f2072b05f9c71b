"""The held-out evaluation during training is `thinkrl eval`'s: the same eval.* settings, the
same numbers for the same checkpoint, config and random state."""

import json

import torch

TINY_RUN = [
    "train",
    "model=tiny-random",
    "dtype=fp32",
    "rollout.max_new_tokens=6",
    "rollout.prompts_per_step=2",
    "rollout.group_size=2",
    "rollout.batch_size=16",
    "progress=false",
    "task.train_size=20",
    "task.eval_size=4",
    "max_steps=1",
    "save_every=0",
    "plot=false",
    "eval.before=false",
    "eval.n=4",
    # every eval.* key differs from what the rollouts use, so one that was ignored shows
    "eval.samples=2",
    "eval.temperature=0.7",
    "eval.batch_size=3",  # 1 prompt per engine chunk instead of the rollouts' 8: other draws
    "eval.max_new_tokens=5",
    "eval.reflection_words=[the,a]",
]


def test_training_time_eval_equals_thinkrl_eval_on_the_final_checkpoint(tmp_path, monkeypatch):
    import thinkrl.trainer.rl as rl
    from thinkrl.cli import main
    from thinkrl.eval import evaluate

    states = []  # the random state each training-time eval started from

    def spy(*a, **kw):
        states.append(torch.get_rng_state())
        return evaluate(*a, **kw)

    monkeypatch.setattr(rl, "evaluate", spy)
    run = tmp_path / "run"
    assert main([*TINY_RUN, f"output_dir={run}"]) == 0
    assert len(states) == 1  # "after" only
    got = json.loads((run / "eval_after.json").read_text())
    assert got["summary"]["samples"] == 2 and "pass@2" in got["summary"] and "maj@2" in got["summary"]
    assert got["summary"]["n"] == 4 and all(len(r["samples"]) == 2 for r in got["records"])
    assert got["summary"]["response_len_max"] <= 5  # eval.max_new_tokens, not rollout's 6

    # `thinkrl eval model=run/final` (which reads the run's config.yaml), from the same random state
    import thinkrl.eval as ev

    def from_the_same_state(*a, **kw):
        torch.set_rng_state(states[0])
        return evaluate(*a, **kw)

    monkeypatch.setattr(ev, "evaluate", from_the_same_state)
    assert main(["eval", f"model={run / 'final'}", f"output={tmp_path / 'eval.json'}", "progress=false"]) == 0
    (want,) = json.loads((tmp_path / "eval.json").read_text())["results"].values()
    for s in (got["summary"], want["summary"]):
        s.pop("seconds")
    assert {k: v for k, v in got["summary"].items() if k not in ("step", "label")} == want["summary"]
    assert got["records"] == want["records"]
    # sampled at temperature 0.7: the two samples of some question differ
    assert any(r["samples"][0]["completion"] != r["samples"][1]["completion"] for r in got["records"])
