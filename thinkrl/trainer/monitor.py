"""The over-optimisation monitor: a proxy reward that rises while the gold reward falls.

When a run optimises a proxy (a learned reward model) and a gold reward is available (the
task's verifiable check, logged with weight 0), the proxy can keep rising while the gold first
rises and then falls as the policy drifts from the reference (Gao et al. 2023, "Scaling laws
for reward model overoptimization"; the CS336 RLHF lecture, slide 13). Configure it with
``monitor.gold=accuracy monitor.proxy=rm monitor.window=W``. Every step then logs both, and the
run stops once, over the last W steps, the least-squares slope of the gold reward is negative
while that of the proxy is positive. ``thinkrl report`` plots both against the KL to the
reference (when ``algo.kl_coef > 0``) or the step.
"""

from __future__ import annotations


def slope(ys: list[float]) -> float:
    """Least-squares slope of ``ys`` against 0, 1, 2, ... (0 for fewer than two points)."""
    n = len(ys)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, sum(ys) / n
    return sum((i - mx) * (y - my) for i, y in enumerate(ys)) / sum((i - mx) ** 2 for i in range(n))


def overoptimised(gold: list[float], proxy: list[float], window: int) -> bool:
    """Gold falling while the proxy rises, over the last ``window`` steps."""
    if window < 2 or len(gold) < window or len(proxy) < window:
        return False
    return slope(gold[-window:]) < 0 < slope(proxy[-window:])


class Monitor:
    """Follows ``reward/<gold>`` and ``reward/<proxy>`` in each step's metrics."""

    def __init__(self, gold: str | None, proxy: str | None, window: int):
        self.gold, self.proxy, self.window = gold, proxy, window
        self.g: list[float] = []
        self.p: list[float] = []

    @property
    def active(self) -> bool:
        return bool(self.gold and self.proxy and self.window)

    def update(self, metrics: dict) -> str | None:
        """Record a step; the reason to stop, if the rule fires."""
        if not self.active:
            return None
        g, p = metrics.get(f"reward/{self.gold}"), metrics.get(f"reward/{self.proxy}")
        if g is None or p is None:
            return None
        self.g.append(float(g))
        self.p.append(float(p))
        metrics["monitor/gold_slope"] = slope(self.g[-self.window :])
        metrics["monitor/proxy_slope"] = slope(self.p[-self.window :])
        if overoptimised(self.g, self.p, self.window):
            return (
                f"over-optimisation: over the last {self.window} steps the gold reward ({self.gold}) fell "
                f"(slope {metrics['monitor/gold_slope']:+.4f}/step) while the proxy ({self.proxy}) rose "
                f"(slope {metrics['monitor/proxy_slope']:+.4f}/step)"
            )
        return None
