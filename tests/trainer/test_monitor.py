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
    reasons = [m.update({"reward/accuracy": g, "reward/rm": p}) for g, p in [(0.5, 0.1), (0.4, 0.2), (0.3, 0.3)]]
    assert reasons[:2] == [None, None] and "gold reward (accuracy) fell" in reasons[2]
    assert not Monitor(None, "rm", 3).active
