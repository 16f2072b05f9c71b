"""``thinkrl report RUN_DIR``: a Markdown page with one PNG per curve, from a run folder.

R1's story is told by its curves: accuracy climbs, responses grow, and reflection
("wait, let me re-check") appears. The report draws exactly those, over steps:
reward, accuracy (with the held-out evaluations), KL to the reference, response
length and reflection frequency, and tabulates the start and end of the run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from thinkrl.config import ConfigError

# (file stem, title, [(metrics key, label)])
PLOTS = [
    ("reward", "reward (mean over samples)", [("reward", "reward")]),
    ("accuracy", "accuracy", [("accuracy", "training samples")]),
    ("kl", "KL to the reference", [("kl", "KL")]),
    ("length", "response length (tokens)", [("response_len_mean", "mean"), ("response_len_max", "max")]),
    (
        "reflection",
        "reflection in the thinking",
        [("reflection_rate", "share of responses with a reflection phrase")],
    ),
]


class ReportError(ConfigError):
    """A run folder that cannot be reported on (missing, or no metrics yet)."""


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    if not path.is_file():
        return rows
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return rows


def _series(metrics: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(m["step"], float(m[key])) for m in metrics if isinstance(m.get(key), (int, float))]
    return [s for s, _ in pts], [v for _, v in pts]


def _moving_average(ys: list[float], k: int) -> list[float]:
    return [sum(ys[max(0, i - k + 1) : i + 1]) / len(ys[max(0, i - k + 1) : i + 1]) for i in range(len(ys))]


def _plot(metrics: list[dict], evals: list[dict], stem: str, title: str, series, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [(key, label, *_series(metrics, key)) for key, label in series]
    drawn = [d for d in drawn if d[2]]
    if not drawn:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    k = max(1, len(metrics) // 10)
    for (_key, label, xs, ys), color in zip(drawn, ("tab:blue", "tab:orange")):
        if k > 1:  # raw values faint, the moving average bold
            ax.plot(xs, ys, color=color, alpha=0.3, lw=1)
            label = f"{label} (moving average of {k})"
        ax.plot(
            xs,
            _moving_average(ys, k),
            color=color,
            lw=2,
            marker="o" if len(xs) < 20 else None,
            ms=3,
            label=label,
        )
    if stem == "accuracy" and evals:
        ax.plot(
            [e["step"] for e in evals],
            [e["accuracy"] for e in evals],
            "o-",
            color="tab:red",
            label="held-out",
        )
    if stem in ("accuracy", "reflection"):  # shares: the whole [0, 1] range, so runs compare by eye
        ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"{stem}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _window_mean(metrics: list[dict], key: str, first: bool) -> float | None:
    _, ys = _series(metrics, key)
    if not ys:
        return None
    w = max(1, len(ys) // 10)
    part = ys[:w] if first else ys[-w:]
    return sum(part) / len(part)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write ``report.md`` and its PNGs into ``out_dir`` (default RUN_DIR/report); return the .md path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ReportError(f"run folder not found: {run}")
    metrics = _read_jsonl(run / "metrics.jsonl")
    if not metrics:
        raise ReportError(f"{run} has no metrics.jsonl with steps yet: is it a training run folder?")
    evals = _read_jsonl(run / "evals.jsonl")
    out = Path(out_dir) if out_dir else run / "report"
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Training report: {run.name}",
        "",
        f"Run folder: `{run}`; {len(metrics)} steps logged (last step {metrics[-1]['step']}).",
        "",
    ]
    lines += ["| metric | first 10% of steps | last 10% of steps |", "|---|---|---|"]
    for key in (
        "reward",
        "accuracy",
        "format_rate",
        "kl",
        "response_len_mean",
        "reflection_rate",
        "zero_std_groups",
    ):
        a, b = _window_mean(metrics, key, True), _window_mean(metrics, key, False)
        if a is not None:
            lines.append(f"| {key} | {_fmt(a)} | {_fmt(b)} |")
    if evals:
        lines += [
            "",
            "Held-out evaluations:",
            "",
            "| step | label | accuracy | format | mean length | n |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {e['step']} | {e.get('label', '')} | {_fmt(e.get('accuracy'))} | {_fmt(e.get('format_rate'))} "
            f"| {_fmt(e.get('response_len_mean'))} | {e.get('n', '')} |"
            for e in evals
        ]
    lines += _tool_section(metrics)
    lines.append("")
    for stem, title, series in PLOTS:
        png = _plot(metrics, evals, stem, title, series, out)
        if png is None:
            lines += [
                f"## {title}",
                "",
                f"not logged in this run ({', '.join(k for k, _ in series)} absent"
                + ("; KL is logged when algo.kl_coef > 0" if stem == "kl" else "")
                + ").",
                "",
            ]
        else:
            lines += [f"## {title}", "", f"![{title}]({png.name})", ""]
    gp = _gold_and_proxy(run, metrics, out)
    if gp is not None:
        lines += ["## gold and proxy reward (over-optimisation)", "", f"![gold and proxy]({gp.name})", ""]
    md = out / "report.md"
    md.write_text("\n".join(lines))
    return md


def _tool_section(metrics: list[dict]) -> list[str]:
    """Tool-call statistics of a multi-turn run (``env.name=python``; thinkrl/envs), or nothing.
    Per-step shares are weighted by the step's episodes (``generated_seqs``)."""
    rows = [m for m in metrics if isinstance(m.get("tool/calls_per_episode"), (int, float))]
    if not rows:
        return []
    n = sum(m.get("generated_seqs", 1) for m in rows)

    def mean(key):
        return sum(m[key] * m.get("generated_seqs", 1) for m in rows) / n

    over = sum(int(m.get("tool/over_budget", 0)) for m in rows)
    killed = sum(int(m.get("tool/killed_calls", 0)) for m in rows)
    out = [
        "",
        f"Tool calls ({n} episodes over {len(rows)} steps):",
        "",
        "| statistic | first 10% of steps | last 10% of steps | whole run |",
        "|---|---|---|---|",
    ]
    for key, label in (
        ("tool/calls_per_episode", "calls per episode"),
        ("tool/episodes_with_call", "share of episodes using the tool"),
        ("tool/policy_tokens_mean", "policy tokens per episode"),
    ):
        if all(key in m for m in rows):
            out.append(
                f"| {label} | {_fmt(_window_mean(rows, key, True))} | {_fmt(_window_mean(rows, key, False))} "
                f"| {_fmt(mean(key))} |"
            )
    out.append(f"| episodes over the tool budget | | | {over} ({over / n:.1%}) |")
    out.append(f"| calls killed by a limit (time, memory, output) | | | {killed} |")
    return out


def _gold_and_proxy(run: Path, metrics: list[dict], out: Path) -> Path | None:
    """Gold and proxy reward against the KL to the reference (or the step): the curve of Gao et
    al. 2023 and the CS336 lecture's slide 13, for runs with ``monitor.gold`` and ``monitor.proxy``."""
    import yaml

    try:
        mon = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("monitor") or {}
    except (OSError, yaml.YAMLError):
        return None
    gold, proxy = mon.get("gold"), mon.get("proxy")
    if not gold or not proxy:
        return None
    rows = [
        m
        for m in metrics
        if isinstance(m.get(f"reward/{gold}"), (int, float))
        and isinstance(m.get(f"reward/{proxy}"), (int, float))
    ]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_kl = all(isinstance(m.get("kl"), (int, float)) for m in rows)
    xs = [m["kl"] if use_kl else m["step"] for m in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    gold_ax = ax.twinx()  # the two rewards live on different scales
    ax.plot(
        xs,
        [m[f"reward/{proxy}"] for m in rows],
        "o-",
        ms=4,
        lw=0.8,
        color="tab:orange",
        label=f"proxy: {proxy}",
    )
    gold_ax.plot(
        xs, [m[f"reward/{gold}"] for m in rows], "s-", ms=4, lw=0.8, color="tab:blue", label=f"gold: {gold}"
    )
    for m, x in zip(rows, xs):  # points in step order, each labelled with its step
        gold_ax.annotate(
            str(m["step"]),
            (x, m[f"reward/{gold}"]),
            fontsize=6,
            xytext=(2, 2),
            textcoords="offset points",
            color="tab:blue",
        )
    ax.set_xlabel("KL to the reference" if use_kl else "step (KL not logged: algo.kl_coef = 0)")
    ax.set_ylabel(f"proxy ({proxy})", color="tab:orange")
    gold_ax.set_ylabel(f"gold ({gold})", color="tab:blue")
    ax.set_title("gold and proxy reward (numbers: steps)")
    ax.grid(alpha=0.3)
    fig.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = out / "gold_proxy.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
