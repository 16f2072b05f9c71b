"""One process vs Ray: synchronous, ``max_staleness=1`` and partial rollouts, on the same budget.

Each variant is one ``thinkrl train`` run with the same seed, steps and batch (so the same
number of samples), differing only in the ``distributed.*`` / ``rollout.*`` keys below. It
reports, per variant: wall-clock per step, generated tokens per second of step time, the
held-out accuracy after training, and the time shares that the cost model of
docs/distributed-ray.md reads (generation g, learner l, weight sync s per step):

    sync, W workers:       T_sync(W)  = g / W + l + s + o
    max_staleness >= 1:    T_async(W) = max(g / W + o, l + s)      (generation hidden behind learning)

g is the workers' own seconds (``worker_time_generate + worker_time_score``), o the split's
overhead. The g, l, s and o of the 1-worker synchronous run predict the other Ray variants;
the table prints prediction and measurement side by side. Step 1 (warm-up) is left out of
the means.

    flock /tmp/thinkrl-cpu.lock python benchmarks/async_vs_sync.py --model smollm2-135m --steps 8
    python benchmarks/async_vs_sync.py --model tiny-random --steps 2 --prompts 2 --group 2 --tokens 8   # smoke
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {  # name -> (overrides, rollout workers, staleness) ; None workers: the single process
    "one process": ([], None, 0),
    "ray sync W=1": (["distributed.backend=ray", "distributed.rollout_workers=1"], 1, 0),
    "ray k=1 W=1": (
        ["distributed.backend=ray", "distributed.rollout_workers=1", "rollout.max_staleness=1"],
        1,
        1,
    ),
    "ray k=1 W=2": (
        ["distributed.backend=ray", "distributed.rollout_workers=2", "rollout.max_staleness=1"],
        2,
        1,
    ),
    "ray partial W=1": (
        [
            "distributed.backend=ray",
            "distributed.rollout_workers=1",
            "rollout.max_staleness=1",
            "rollout.partial_tokens=PARTIAL",
        ],
        1,
        1,
    ),
}


def run(name: str, extra: list[str], args, out: Path) -> dict:
    folder = out / name.replace(" ", "_").replace("=", "")
    base = [
        f"model={args.model}",
        f"output_dir={folder}",
        f"max_steps={args.steps}",
        "save_every=0",
        "plot=false",
        "progress=false",
        "eval.before=false",
        f"eval.n={args.eval_n}",
        f"rollout.prompts_per_step={args.prompts}",
        f"rollout.group_size={args.group}",
        f"rollout.max_new_tokens={args.tokens}",
        "algo.tis_cap=2.0",
        f"seed={args.seed}",
        "ray.num_cpus=2",
    ]
    cmd = [
        sys.executable,
        "-m",
        "thinkrl",
        "train",
        *base,
        *[e.replace("PARTIAL", str(args.tokens // 2)) for e in extra],
    ]
    if not any(e.startswith("distributed.") for e in extra):
        cmd = [c for c in cmd if c != "ray.num_cpus=2" and c != "algo.tis_cap=2.0"]
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    evals = (
        [json.loads(x) for x in (folder / "evals.jsonl").read_text().splitlines()]
        if (folder / "evals.jsonl").exists()
        else []
    )
    rows = rows[1:] if len(rows) > 1 else rows  # step 1 carries the warm-up (first calls, allocations)
    tokens = sum(r["response_len_mean"] * r["generated_seqs"] for r in rows)
    n = len(rows)
    if "worker_time_generate" in rows[0]:  # Ray: the workers' own seconds, whether or not the driver waited
        g = sum(r["worker_time_generate"] + r["worker_time_score"] for r in rows) / n
    else:
        g = sum(r["time_generate"] + r["time_score"] for r in rows) / n
    step = sum(r["step_time"] for r in rows) / n  # Ray: the driver's wait + learner + weight sync
    return {
        "variant": name,
        "step_s": step,
        "tokens_per_s": tokens / max(1e-9, step * n),
        "accuracy": evals[-1]["accuracy"] if evals else float("nan"),
        "g": g,
        "l": sum(r["time_train"] for r in rows) / n,
        "s": sum(r.get("time_sync", 0.0) for r in rows) / n,
        "run_wall_s": wall,
        "staleness": sum(r.get("staleness_mean", 0.0) for r in rows) / n,
    }


def predict(ref: dict, workers: int, staleness: int) -> float:
    """The cost model, fitted on the 1-worker synchronous run: its g, l, s, and the overhead o
    (dispatch, transfers, waits) as what its step time has beyond g + l + s."""
    g, learn, s = ref["g"], ref["l"], ref["s"]  # generation, learner and sync seconds per step
    o = max(0.0, ref["step_s"] - (g + learn + s))
    return max(g / workers + o, learn + s) if staleness >= 1 else g / workers + learn + s + o


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--eval-n", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/async_vs_sync")
    ap.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    args = ap.parse_args()
    out = Path(args.out)
    res = [run(n, v[0], args, out) for n, v in VARIANTS.items() if not args.only or n in args.only]
    ref = next((r for r in res if r["variant"] == "ray sync W=1"), None)
    print(
        f"{'variant':<18} {'s/step':>8} {'predicted':>9} {'tok/s':>8} {'acc':>6} {'stale':>6} "
        f"{'g':>7} {'l':>7} {'sync':>6}"
    )
    for r in res:
        spec = VARIANTS[r["variant"]]
        pred = f"{predict(ref, spec[1], spec[2]):9.2f}" if ref and spec[1] else f"{'':>9}"
        print(
            f"{r['variant']:<18} {r['step_s']:8.2f} {pred} {r['tokens_per_s']:8.1f} {r['accuracy']:6.3f} "
            f"{r['staleness']:6.2f} {r['g']:7.2f} {r['l']:7.2f} {r['s']:6.2f}"
        )
    (out / "results.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
