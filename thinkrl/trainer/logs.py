"""Run-folder outputs: metrics.jsonl, samples.jsonl and the PNG curves."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


class JsonlWriter:
    """Appends one JSON object per line, each line flushed and fsynced before ``write``
    returns: a line is on disk before the step's checkpoint is, so a resume never finds a
    checkpoint newer than its metrics.

    ``truncate_after_step``: on resume, drop the lines of steps after the checkpoint's
    (they are redone) and a torn last line that a crash cut off mid-write. The file is
    rewritten aside and renamed over the old one, so a crash here loses nothing."""

    def __init__(self, path: Path, truncate_after_step: int | None = None):
        self.path = Path(path)
        if truncate_after_step is not None and self.path.exists():
            keep = [
                line
                for line in _whole_lines(self.path)
                if json.loads(line).get("step", 0) <= truncate_after_step
            ]
            tmp = self.path.with_name(self.path.name + ".tmp")
            with tmp.open("w") as f:
                f.write("".join(line + "\n" for line in keep))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)

    def write(self, obj: dict) -> None:
        self.write_many([obj])

    def write_many(self, objs: list[dict]) -> None:
        if not objs:
            return
        text = "".join(json.dumps(_finite_or_null(o), ensure_ascii=False) + "\n" for o in objs)
        with self.path.open("a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def _finite_or_null(obj: dict) -> dict:
    """NaN and infinity are not JSON: they are written as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in obj.items()}


def _whole_lines(path: Path) -> list[str]:
    """The lines of a JSONL file that parse; only the last one can be torn (by a crash mid-append)."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if lines:
        try:
            json.loads(lines[-1])
        except ValueError:
            lines.pop()
    return lines


def read_jsonl(path: Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in _whole_lines(p)]


PANELS = [
    ("reward", "reward (mean)"),
    ("accuracy", "accuracy (train samples)"),
    ("format_rate", "format rate"),
    ("response_len_mean", "response length (tokens)"),
    ("kl", "KL to reference"),
    ("entropy", "entropy (nats/token)"),
    ("clip_frac", "clip fraction"),
    ("step_time", "step time (s)"),
]


def _smooth(ys: list[float], k: int) -> list[float]:
    out, acc = [], []
    for y in ys:
        acc.append(y)
        if len(acc) > k:
            acc.pop(0)
        vals = [v for v in acc if v is not None and not math.isnan(v)]
        out.append(sum(vals) / len(vals) if vals else float("nan"))
    return out


def plot_metrics(
    metrics: list[dict], out_png: Path, title: str = "", evals: list[dict] | None = None
) -> Path | None:
    """One PNG with a panel per curve; raw values faint, a moving average bold."""
    if not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, label) for k, label in PANELS if any(k in m for m in metrics)]
    cols = 4
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    steps = [m["step"] for m in metrics]
    k = max(1, len(metrics) // 10)
    for ax, (key, label) in zip(axes.flat, panels):
        ys = [float("nan") if m.get(key) is None else m[key] for m in metrics]
        ax.plot(steps, ys, color="tab:blue", alpha=0.3, lw=1)
        ax.plot(steps, _smooth(ys, k), color="tab:blue", lw=2)
        if key == "accuracy" and evals:
            ax.plot(
                [e["step"] for e in evals],
                [e["accuracy"] for e in evals],
                "o-",
                color="tab:red",
                label="held-out (greedy)",
            )
            ax.legend(fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return Path(out_png)
