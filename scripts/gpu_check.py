"""thinkrl on one CUDA GPU in a few minutes: the CUDA tests, three GRPO steps, and a speed
benchmark on randomly initialised models of real architectures (thinkrl/models/archs.py).

Run it through ``scripts/gpu_check.sh`` (which first installs thinkrl's pure-Python
dependencies from a wheels folder when given one). Stages, each printed as it runs:

1. ``tests``: ``pytest -m cuda tests/gpu`` (skipped cleanly where there is no GPU);
2. ``grpo``: ``python -m thinkrl train`` for ``--steps`` steps on a random SmolLM2-135M-shaped
   model and a small arithmetic JSONL task written here, on ``--device``; checks that every
   step was logged with a finite loss;
3. ``bench``: per architecture, ``--bench-steps`` timed GRPO-shaped steps (hf-engine rollouts
   of ``--prompts`` x ``--group`` samples of ``--new-tokens`` tokens, then a policy-gradient
   forward/backward and an AdamW step, then ``sync_weights``), after one warm-up step; prints
   s/step, generated tokens/s and peak GPU memory, and writes them to ``OUT/bench.json``.

``--dry-run`` does only what a CPU can do quickly: parse the arguments, build every
architecture on the meta device (no memory) and check its parameter count, and print the
commands the other stages would run. Exit status: 0 when every stage passed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("tests", "grpo", "bench")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from thinkrl.models.archs import arch_names

    ap = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "thinkrl-gpu-check")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N (or cpu, for a slow smoke run)")
    ap.add_argument(
        "--archs", default=",".join(arch_names()), help=f"comma-separated, from: {', '.join(arch_names())}"
    )
    ap.add_argument("--only", default=",".join(STAGES), help=f"stages to run, from: {', '.join(STAGES)}")
    ap.add_argument("--steps", type=int, default=3, help="GRPO steps of the grpo stage")
    ap.add_argument("--bench-steps", type=int, default=3, help="timed steps per architecture")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    args.archs = [a for a in args.archs.split(",") if a]
    args.only = [s for s in args.only.split(",") if s]
    bad = [a for a in args.archs if a not in arch_names()] + [s for s in args.only if s not in STAGES]
    if bad:
        ap.error(
            f"unknown {', '.join(bad)}; architectures: {', '.join(arch_names())}; stages: {', '.join(STAGES)}"
        )
    for k in ("steps", "bench_steps", "prompts", "group", "prompt_tokens", "new_tokens"):
        if getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be >= 1")
    return args


# ---------------------------------------------------------------------------
# The stages


def test_command() -> list[str]:
    return [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "cuda",
        "-p",
        "no:cacheprovider",
        str(REPO / "tests" / "gpu"),
    ]


def grpo_command(args: argparse.Namespace, model_dir: Path, task: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "thinkrl",
        "train",
        f"model={model_dir}",
        f"task.name={task}",
        f"device={args.device}",
        f"max_steps={args.steps}",
        f"output_dir={args.out / 'grpo'}",
        "rollout.prompts_per_step=4",
        "rollout.group_size=4",
        "rollout.max_new_tokens=32",
        "rollout.backend=hf",
        "eval.before=false",
        "eval.after=false",
        "plot=false",
        "progress=false",
        "save_every=0",
    ]


def write_task(path: Path, n: int = 64) -> Path:
    """Sums of two 1-digit numbers: a task whose answers a check can verify without data files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(n):
            a, b = i % 10, (3 * i + 1) % 10
            f.write(json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n")
    return path


def check_models(archs: list[str]) -> dict[str, int]:
    """Each architecture built on the meta device: its parameter count (nothing allocated)."""
    from thinkrl.models import build_tiny_tokenizer
    from thinkrl.models.archs import build_random, n_params

    tok = build_tiny_tokenizer()
    return {a: n_params(build_random(a, tok, device="meta")) for a in archs}


def run_grpo(args: argparse.Namespace) -> bool:
    from thinkrl.models.archs import save_random

    model_dir = args.out / "smollm2-135m-random"
    if not (model_dir / "config.json").is_file():
        save_random("smollm2-135m", model_dir)
    cmd = grpo_command(args, model_dir, write_task(args.out / "sums.jsonl"))
    print("+", " ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        return False
    rows = [json.loads(line) for line in (args.out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    ok = [r["step"] for r in rows] == list(range(1, args.steps + 1)) and all(
        math.isfinite(r.get("loss", float("nan"))) for r in rows
    )
    for r in rows:
        print(
            f"  step {r['step']}: loss {r.get('loss')}, reward {r['reward']:.3f}, step_time {r['step_time']:.2f} s"
        )
    return ok


def bench(args: argparse.Namespace, arch: str) -> dict:
    """Timed GRPO-shaped steps on a random model of ``arch``; see the module docstring."""
    import torch

    from thinkrl import device
    from thinkrl.models import build_tiny_tokenizer
    from thinkrl.models.archs import build_random, n_params
    from thinkrl.rollout import SamplingParams, build_engine
    from thinkrl.trainer.batch import split_grouped_micro_batches, token_logps

    dev = device.resolve_device(args.device)
    device.setup(dev)
    bf16 = device.use_bf16("auto", dev)
    tok = build_tiny_tokenizer()
    model = build_random(arch, tok, device=dev)
    model.config.use_cache = False
    model.set_attn_implementation(device.train_attention(dev))
    engine = build_engine("hf", model, tok, batch_size=args.prompts * args.group, bf16=bf16, device=dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, len(tok) - 3, (args.prompts, args.prompt_tokens), generator=g).tolist()
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=0)
    G = args.group
    cuda = device.is_cuda(dev)
    times, gen_times, tokens = [], [], []
    for step in range(args.bench_steps + 1):  # step 0 warms up (kernels, allocator)
        if cuda:
            torch.cuda.synchronize()
            if step == 1:
                torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        ro = engine.generate(prompts, G, params)
        t1 = time.perf_counter()
        mbs = split_grouped_micro_batches(
            ro.prompt_ids, ro.completion_ids, list(range(args.prompts)), G, 16, tok.pad_token_id
        )
        adv = torch.randn(len(ro.completion_ids), generator=g)  # [N] stand-in advantages
        n_tok = sum(map(len, ro.completion_ids))
        opt.zero_grad(set_to_none=True)
        for mb in mbs:
            logp, _ = token_logps(model, mb, bf16=bf16)  # [b, T]
            loss = -(logp * device.to(adv[mb.index, None], logp.device)).sum() / n_tok
            loss.backward()
        opt.step()
        engine.sync_weights(model)
        if cuda:
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t0)
            gen_times.append(t1 - t0)
            tokens.append(n_tok)
    out = {
        "arch": arch,
        "params": n_params(model),
        "device": device.describe(dev),
        "bf16": bf16,
        "prompts": args.prompts,
        "group": G,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "s_per_step": sum(times) / len(times),
        "generate_s_per_step": sum(gen_times) / len(gen_times),
        "tokens_per_s": sum(tokens) / sum(times),
        "generate_tokens_per_s": sum(tokens) / sum(gen_times),
        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None,
    }
    print(
        f"  {arch}: {out['s_per_step']:.2f} s/step ({out['generate_s_per_step']:.2f} s generating), "
        f"{out['tokens_per_s']:.0f} tokens/s per step ({out['generate_tokens_per_s']:.0f} while generating), "
        f"peak GPU memory {out['peak_gpu_mem_gib'] or 0:.2f} GiB",
        flush=True,
    )
    del engine, model, opt
    if cuda:
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = check_models(args.archs)
    for a, n in counts.items():
        print(f"[models] {a}: {n:,} parameters (random init from thinkrl/models/configs/{a}.json)")
    if args.dry_run:
        print("[dry-run] tests:", " ".join(test_command()))
        print(
            "[dry-run] grpo: ",
            " ".join(grpo_command(args, args.out / "smollm2-135m-random", args.out / "sums.jsonl")),
        )
        print(
            f"[dry-run] bench: {', '.join(args.archs)} on {args.device}: {args.bench_steps} steps of "
            f"{args.prompts} x {args.group} samples, {args.prompt_tokens} + {args.new_tokens} tokens"
        )
        return 0
    import torch

    print(
        f"[env] torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}",
        flush=True,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    if "tests" in args.only:
        print("[tests]", flush=True)
        if subprocess.run(test_command(), cwd=REPO).returncode != 0:
            failed.append("tests")
    if "grpo" in args.only:
        print(f"[grpo] {args.steps} steps on {args.device}", flush=True)
        if not run_grpo(args):
            failed.append("grpo")
    if "bench" in args.only:
        print("[bench]", flush=True)
        results = []
        for arch in args.archs:
            try:
                results.append(bench(args, arch))
            except Exception as e:  # noqa: BLE001 (report and go on to the next architecture)
                print(f"  {arch}: FAILED: {type(e).__name__}: {e}", flush=True)
                failed.append(f"bench {arch}")
        (args.out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"[done] {'FAILED: ' + ', '.join(failed) if failed else 'all stages passed'}; results in {args.out}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
