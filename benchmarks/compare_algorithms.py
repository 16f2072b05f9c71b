"""GRPO, Dr. GRPO, RLOO, REINFORCE++ and PPO side by side, on the same task with the same budget.

Each algorithm is one ``thinkrl train`` run of ``configs/chain_sum_grpo.yaml`` with the
same seed, steps and batch, differing only in its ``algo.*`` parts. Every run goes
through ``flock /tmp/thinkrl-cpu.lock`` so that heavy jobs never overlap on a small
machine (or run the whole script under that lock with ``--no-lock``, so that the
runs follow each other under the same conditions); the wall time reported is the sum
of the runs' own step times (generation, scoring, update), so time spent waiting for
the lock or evaluating does not count.

    flock /tmp/thinkrl-cpu.lock python benchmarks/compare_algorithms.py --no-lock --steps 8 --prompts 4

writes ``<out>/<algo>/`` run folders, ``docs/algorithms_rewards.png`` and the results
block of ``docs/algorithms.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = "/tmp/thinkrl-cpu.lock"
START, END = "<!-- benchmark:start -->", "<!-- benchmark:end -->"

# name -> overrides of the algo section (everything else is the shared base recipe)
RECIPES = {
    "grpo": ["algo.advantage=grpo"],
    "dr_grpo": ["algo.advantage=dr_grpo"],
    "rloo": ["algo.advantage=rloo"],
    "reinforce_pp": ["algo.advantage=reinforce_pp", "algo.kl_coef=0.01", "algo.kl_estimator=k1"],
    "ppo (gae)": ["algo.advantage=gae", "algo.kl_coef=0.01", "algo.kl_estimator=k1", "algo.critic_lr=5e-5"],
}


def read_jsonl(path: Path) -> list[dict]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    )


def run(name: str, overrides: list[str], args, first: bool) -> Path:
    out = Path(args.out) / name.split()[0]
    if (out / "final").is_dir() and not args.force:
        print(f"[{name}] reusing {out}")
        return out
    lock = [] if args.no_lock else ["flock", LOCK]
    cmd = [
        *lock,
        sys.executable,
        "-m",
        "thinkrl.cli",
        "train",
        str(ROOT / "configs/chain_sum_grpo.yaml"),
        f"output_dir={out}",
        f"max_steps={args.steps}",
        f"rollout.prompts_per_step={args.prompts}",
        f"eval.n={args.eval_n}",
        f"eval.before={'true' if first else 'false'}",
        "save_every=0",
        "plot=false",
        "progress=false",
        *overrides,
    ]
    print("$", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return out


def summarise(name: str, out: Path) -> dict:
    metrics = read_jsonl(out / "metrics.jsonl")
    evals = {e["label"]: e for e in read_jsonl(out / "evals.jsonl")}
    train_s = sum(m["step_time"] for m in metrics)
    times = sorted(m["step_time"] for m in metrics)
    return {
        "name": name,
        "steps": len(metrics),
        "rewards": [m["reward"] for m in metrics],
        "acc": evals["after"]["accuracy"],
        "before": evals.get("before", {}).get("accuracy"),
        "len": evals["after"]["response_len_mean"],
        "train_len": sum(m["response_len_mean"] for m in metrics) / max(1, len(metrics)),
        "wall": train_s,
        "median_step": times[len(times) // 2] if times else float("nan"),
        "n": evals["after"]["n"],
    }


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in rows:
        ax.plot(range(1, len(r["rewards"]) + 1), r["rewards"], marker="o", ms=3, label=r["name"])
    ax.set_xlabel("step")
    ax.set_ylabel("mean training reward (accuracy + 0.1 format)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows: list[dict], args, command: str) -> str:
    before = next((r["before"] for r in rows if r["before"] is not None), None)
    lines = [
        f"Measured {datetime.date.today().isoformat()} on a 2-core CPU (bf16 autocast), with",
        "",
        "```",
        command,
        "```",
        "",
        f"Base recipe `configs/chain_sum_grpo.yaml` (smollm2-135m, chain_sum), {args.steps} steps of "
        f"{args.prompts} prompts x 8 samples, 64 new tokens, seed 0; held-out accuracy on {rows[0]['n']} "
        "questions (greedy)" + (f"; the initial model scores {before:.3f}." if before is not None else "."),
        "",
        "| algorithm | held-out accuracy | mean response length (eval) | mean response length (train) "
        "| train wall time (s) | median s / step |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['acc']:.3f} | {r['len']:.1f} | {r['train_len']:.1f} | {r['wall']:.0f} "
            f"| {r['median_step']:.1f} |"
        )
    lines += ["", "![reward curves](algorithms_rewards.png)"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step (8 samples each)")
    ap.add_argument("--eval-n", type=int, default=100)
    ap.add_argument("--out", default=str(ROOT / "runs/compare_algorithms"))
    ap.add_argument("--doc", default=str(ROOT / "docs/algorithms.md"))
    ap.add_argument("--only", nargs="*", help="run only these recipes (the doc lists every finished one)")
    ap.add_argument("--no-lock", action="store_true", help=f"the caller already holds {LOCK}")
    ap.add_argument("--report", action="store_true", help="run nothing; rewrite the doc from finished runs")
    ap.add_argument("--force", action="store_true", help="re-run recipes that already have a final/ folder")
    args = ap.parse_args()

    names = list(RECIPES)
    for i, name in enumerate(names):
        if args.report or (args.only and name.split()[0] not in args.only):
            continue
        run(name, RECIPES[name], args, first=i == 0)
    rows = [
        summarise(n, Path(args.out) / n.split()[0])
        for n in names
        if (Path(args.out) / n.split()[0] / "final").is_dir()
    ]
    plot(
        rows,
        Path(args.doc).parent / "algorithms_rewards.png",
        f"smollm2-135m on chain_sum, {args.steps} steps x {args.prompts * 8} samples",
    )
    command = shlex.join(
        [
            *(["flock", LOCK] if args.no_lock else []),
            "python",
            "benchmarks/compare_algorithms.py",
            *(["--no-lock"] if args.no_lock else []),
            "--steps",
            str(args.steps),
            "--prompts",
            str(args.prompts),
            "--eval-n",
            str(args.eval_n),
        ]
    )
    doc = Path(args.doc)
    text = doc.read_text() if doc.is_file() else f"# Algorithms\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    doc.write_text(f"{head}{START}\n{table(rows, args, command)}\n{END}{rest.split(END, 1)[1]}")
    for r in rows:
        print(f"{r['name']:>14}: acc {r['acc']:.3f}  len {r['len']:.1f}  {r['wall']:.0f} s")


if __name__ == "__main__":
    main()
