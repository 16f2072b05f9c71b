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
    from thinkrl.config import build_config
    from thinkrl.eval import eval_settings, evaluate
    from thinkrl.models import load_model
    from thinkrl.rollout import engine_on
    from thinkrl.tasks import build_task
    from thinkrl.tasks.templates import drop_long_prompts

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

    # what `thinkrl eval model=run/final` runs (thinkrl/cli.py cmd_eval), from the same random state
    cfg = build_config(str(run / "config.yaml"), [])
    task = build_task(cfg.task)
    model, tok = load_model(str(run / "final"))
    drop_long_prompts(task, tok, cfg.task)
    engine = engine_on(
        cfg.rollout.backend,
        model,
        tok,
        batch_size=cfg.eval.batch_size,
        dtype=cfg.dtype,
        device_name=cfg.device,
    )
    torch.set_rng_state(states[0])
    want = evaluate(engine, tok, task.eval[: cfg.eval.n], cfg.task, **eval_settings(cfg))
    json_round_trip = json.loads(json.dumps(want))
    for s in (got["summary"], json_round_trip["summary"]):
        s.pop("seconds")
    assert {k: v for k, v in got["summary"].items() if k not in ("step", "label")} == json_round_trip[
        "summary"
    ]
    assert got["records"] == json_round_trip["records"]
    # sampled at temperature 0.7: the two samples of some question differ
    assert any(r["samples"][0]["completion"] != r["samples"][1]["completion"] for r in got["records"])
