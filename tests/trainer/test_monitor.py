from thinkrl.trainer.monitor import Monitor, overoptimised, slope


def test_slope_hand_worked():
    assert slope([1.0, 2.0, 3.0]) == 1.0
    assert slope([3.0, 1.0]) == -2.0
    assert slope([5.0]) == 0.0
    # y = [0, 2, 1, 3]: x mean 1.5, y mean 1.5, cov = (-1.5*-1.5 + -0.5*0.5 + 0.5*-0.5 + 1.5*1.5) = 4, var = 5
    assert slope([0.0, 2.0, 1.0, 3.0]) == 0.8


def test_the_rule_fires_when_gold_falls_as_the_proxy_rises():
    # a synthetic Goodhart curve: gold rises for 6 steps, then falls; the proxy rises throughout
    gold = [0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.5, 0.4, 0.3, 0.2]
    proxy = [0.1 * i for i in range(10)]
    fired = [overoptimised(gold[: i + 1], proxy[: i + 1], window=4) for i in range(10)]
    assert fired == [False] * 7 + [True] * 3  # last 4 at step 7: 0.55, 0.5, 0.4 after 0.5: slope -0.05
    assert not overoptimised(gold, [-p for p in proxy], window=4)  # both falling: not this failure


def test_the_monitor_reads_metrics_and_gives_its_reason():
    m = Monitor("accuracy", "rm", window=3)
    reasons = [
        m.update({"reward/accuracy": g, "reward/rm": p}) for g, p in [(0.5, 0.1), (0.4, 0.2), (0.3, 0.3)]
    ]
    assert reasons[:2] == [None, None] and "gold reward (accuracy) fell" in reasons[2]
    assert not Monitor(None, "rm", 3).active


def test_a_run_stops_when_gold_falls_while_the_proxy_rises(tmp_path, caplog):
    """Two rewards driven by the step: gold (weight 0, only logged) falls, the proxy rises. With a
    window of 3 the rule fires at step 3: the run stops there, writes final/, and says why."""
    import json
    import uuid

    from thinkrl.cli import main
    from thinkrl.rewards import REWARDS

    calls = {"gold": 0, "proxy": 0}
    per_step = 2 * 4  # prompts_per_step x group_size
    gold, proxy = f"test_gold_{uuid.uuid4().hex[:6]}", f"test_proxy_{uuid.uuid4().hex[:6]}"

    @REWARDS.register(gold)
    def _gold(completion, example):
        calls["gold"] += 1
        return 1.0 - 0.1 * ((calls["gold"] - 1) // per_step)

    @REWARDS.register(proxy)
    def _proxy(completion, example):
        calls["proxy"] += 1
        return 0.1 * ((calls["proxy"] - 1) // per_step) + (0.01 if calls["proxy"] % 2 else 0.0)

    run = tmp_path / "run"
    rc = main(
        [
            "train",
            "model=tiny-random",
            "rollout.max_new_tokens=8",
            "rollout.prompts_per_step=2",
            "rollout.group_size=4",
            "progress=false",
            "task.train_size=50",
            "task.eval_size=8",
            "eval.before=false",
            "eval.after=false",
            "plot=false",
            "max_steps=8",
            "save_every=0",
            f"output_dir={run}",
            f"rewards={{{gold}: 0.0, {proxy}: 1.0}}",
            f"monitor.gold={gold}",
            f"monitor.proxy={proxy}",
            "monitor.window=3",
        ]
    )
    assert rc == 0
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert [round(m[f"reward/{gold}"], 6) for m in steps] == [1.0, 0.9, 0.8]
    assert steps[-1]["monitor/gold_slope"] < 0 < steps[-1]["monitor/proxy_slope"]
    assert (run / "final" / "config.json").is_file()
    assert any("over-optimisation" in r.getMessage() for r in caplog.records)
