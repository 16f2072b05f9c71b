"""Accuracy against thinking budget: the table and the curve of ``thinkrl eval thinking_budget=...``.

Qwen3's technical report shows accuracy rising smoothly with the number of thinking tokens
allowed; this draws the same curve for any model, from one :func:`thinkrl.eval.evaluate` run
per budget (see :mod:`thinkrl.rollout.thinking` for how a budget is enforced).
"""

from __future__ import annotations

from pathlib import Path

from thinkrl.config import ConfigError

COLUMNS = ("accuracy", "response_len_mean", "forced_rate", "format_rate", "n")


def parse_budgets(text: str) -> list[int]:
    """``"32,64,128"`` -> [32, 64, 128]: whole numbers >= 0, each once, in the order given."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items or not all(x.isdigit() for x in items):
        raise ConfigError(
            f"thinking_budget must be a comma-separated list of whole numbers >= 0 "
            f"(e.g. thinking_budget=32,64,128), got {text!r}"
        )
    budgets = [int(x) for x in items]
    if len(set(budgets)) != len(budgets):
        raise ConfigError(f"thinking_budget lists a budget twice: {text!r}")
    return budgets


def format_budget_table(curves: list[tuple[str, dict[int, dict]]]) -> str:
    """Plain-text table, one row per (model, budget): ``curves`` holds (model, {budget:
    the summary that :func:`thinkrl.eval.evaluate` returned at that budget})."""
    from thinkrl.eval import _fmt

    head = ["model", "thinking_budget", *COLUMNS]
    body = [
        [name, str(b), *(_fmt(s.get(c)) for c in COLUMNS)]
        for name, by_budget in curves
        for b, s in by_budget.items()
    ]
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    line = lambda r: "  ".join(x.ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in body])


def plot_budget_curve(curves: list[tuple[str, dict[int, dict]]], path: Path) -> Path:
    """Accuracy (left) and mean response length in tokens (right) against the budget, one
    line per model, on a log2 budget axis (budgets are usually powers of two), to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, len_ax) = plt.subplots(1, 2, figsize=(9, 3.6))
    for name, by_budget in curves:
        xs = sorted(by_budget)
        label = Path(name).name or name
        acc_ax.plot(xs, [by_budget[b]["accuracy"] for b in xs], "o-", label=label)
        len_ax.plot(xs, [by_budget[b]["response_len_mean"] for b in xs], "o-", label=label)
    for ax, title in ((acc_ax, "held-out accuracy"), (len_ax, "mean response length (tokens)")):
        if all(b > 0 for _, by_budget in curves for b in by_budget):
            ax.set_xscale("log", base=2)
        ax.set_xlabel("thinking budget (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    acc_ax.set_ylim(-0.02, 1.02)
    acc_ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
