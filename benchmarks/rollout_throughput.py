"""Rollout throughput: thinkrl's fast engine vs HF ``generate``, side by side in one run.

Same model, same prompts (the default task's chat prompts), same sampling settings
(temperature 1.0, no top-p/top-k), in the dtype ``thinkrl/device.py`` picks for this CPU (bf16
where it has bf16 instructions that time faster than fp32, fp32 otherwise; ``--dtype``
overrides), the same for every engine, and printed. Two workloads:

- ``fixed``: 64 sequences x exactly 128 new tokens (end-of-sequence banned until then,
  ``min_new_tokens`` in both engines): the issue's yardstick, every row does the same work;
- ``natural``: the same 64 sequences stopping at end-of-sequence (at most 128 new tokens),
  which is what training sees: most answers are short, a few run long.

Each engine runs ``--repeats`` times per workload (engines interleaved, a different seed per
repeat); the medians are compared. In bf16, HF ``generate`` runs twice: under bf16 autocast on
the fp32 model (thinkrl's ``hf`` backend) and on a copy of the model cast to bf16 (HF's
fastest plain CPU setting); in fp32 it runs on the fp32 model. Ratios are taken against the
fastest HF run. The engine also runs once without its prepacked weights (``thinkrl_fast_unpacked``) and once with its decode attention on torch
ops instead of its C kernel (``thinkrl_fast_torch_attention``), to show what each buys. Then, on the natural rollout, the engine's
sampled-token log-probs are compared with the training forward pass (in the run's dtype and
in fp32), the correctness check the trainer relies on. Last, the floor no engine can go under
on this machine: the time of one decode step's linear layers alone (every layer's four
matmuls and the LM head, 64 rows, in the run's dtype, the engine's own prepacked weights),
which gives the highest tokens/s any exact engine could reach in that dtype, and that as a
ratio to HF; and the same matmul work at the machine's large-GEMM rate (2048^3), the ceiling
the issue's "share of the matmul ceiling" is measured against.

    python benchmarks/rollout_throughput.py [--model smollm2-135m] [--prompts 8] [--n 8] [--max-new 128] [--repeats 3] [--dtype auto]
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import time

import torch

from thinkrl import device
from thinkrl.config import Config
from thinkrl.models import load_model
from thinkrl.perf import matmul_rate
from thinkrl.rollout import HFEngine, SamplingParams
from thinkrl.rollout.fast import FastEngine
from thinkrl.tasks import build_task
from thinkrl.tasks.templates import render_prompt
from thinkrl.trainer.batch import split_micro_batches, token_logps


def run(engine, prompts, n, params, seed):
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    ro = engine.generate_text(prompts, n, params)
    dt = time.perf_counter() - t0
    return ro, sum(len(c) for c in ro.completion_ids), dt


def logp_gap(model, tok, ro, bf16: bool) -> tuple[float, float]:
    """Max and mean |engine log-prob - training-forward log-prob| over the sampled tokens."""
    rows = list(range(len(ro.completion_ids)))
    mbs = split_micro_batches(ro.prompt_ids, ro.completion_ids, rows, 16, tok.pad_token_id or 0)
    diffs = []
    with torch.no_grad():
        for mb in mbs:
            lp, _ = token_logps(model, mb, bf16=bf16)  # [b, T]
            for j, i in enumerate(mb.index.tolist()):
                n = len(ro.completion_ids[i])
                diffs.append((lp[j, :n] - torch.tensor(ro.logps[i])).abs())
    d = torch.cat(diffs)
    return d.max().item(), d.mean().item()


def linear_floor(engine: FastEngine, rows: int, reps: int = 7) -> tuple[float, float]:
    """Seconds for one decode step's matmuls alone (median of ``reps``) and their GFLOP/s."""
    from thinkrl.rollout.fast import PACKED

    engine.sync()
    mats = [(getattr(L, k), (L.packed or {}).get(k)) for L in engine.layers for k in PACKED]
    mats.append((engine.head, engine.head_packed))
    xs = {w.shape[1]: torch.randn(rows, w.shape[1]).to(w.dtype) for w, _ in mats}
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        for w, p in mats:
            engine._linear(xs[w.shape[1]], w, p)
        times.append(time.perf_counter() - t0)
    sec = sorted(times[1:])[reps // 2]
    return sec, sum(2 * rows * w.numel() for w, _ in mats) / sec / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--workloads", default="fixed,natural")
    ap.add_argument(
        "--repeats", type=int, default=3, help="runs per engine and workload; medians are compared"
    )
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    args = ap.parse_args()

    model, tok = load_model(args.model)
    model.eval()
    bf16 = device.use_bf16(args.dtype)
    cfg = Config()
    examples = build_task(cfg.task).next_batch(args.prompts)
    prompts = [render_prompt(ex.question, tok, cfg.task)[0] for ex in examples]
    B = args.prompts * args.n
    hf = "hf_generate_autocast" if bf16 else "hf_generate_fp32"  # thinkrl's hf backend in this dtype
    engines = {
        hf: HFEngine(model, tok, batch_size=B, bf16=bf16),
        "thinkrl_fast": FastEngine(model, tok, batch_size=B, bf16=bf16),
        # the same engine with plain F.linear instead of prepacked weights
        "thinkrl_fast_unpacked": FastEngine(model, tok, batch_size=B, bf16=bf16, prepack=False),
        # the same engine with its decode attention on torch ops instead of the C kernel
        "thinkrl_fast_torch_attention": FastEngine(model, tok, batch_size=B, bf16=bf16, kernel=False),
    }
    if bf16:
        engines["hf_generate_bf16_model"] = HFEngine(
            copy.deepcopy(model).to(torch.bfloat16), tok, batch_size=B
        )
    print(f"CPU: {device.plan().describe()}")
    print(
        f"model={args.model} dtype={'bf16' if bf16 else 'fp32'} sequences={B} max_new_tokens={args.max_new} "
        f"threads={torch.get_num_threads()} prompt tokens={[len(tok(p).input_ids) for p in prompts]}"
    )
    natural = None
    for work in args.workloads.split(","):
        params = SamplingParams(
            max_new_tokens=args.max_new,
            temperature=1.0,
            min_new_tokens=args.max_new if work == "fixed" else 0,
        )
        rates: dict[str, list[float]] = {name: [] for name in engines}
        for r in range(args.repeats):  # engines interleaved, so a slow spell of the machine hits all alike
            for name, eng in engines.items():
                run(eng, prompts[:1], 2, SamplingParams(max_new_tokens=4), 0)  # warm-up
                ro, toks, secs = run(eng, prompts, args.n, params, seed=r)
                rates[name].append(toks / secs)
                if name == "thinkrl_fast" and work == "natural" and r == 0:
                    natural = ro
                print(
                    f"[{work}] repeat {r + 1}: {name:>28}: {toks} new tokens in {secs:.1f} s = "
                    f"{toks / secs:.0f} tokens/s",
                    flush=True,
                )
        for name, rs in rates.items():
            print(
                f"[{work}] {name:>28}: median {statistics.median(rs):.0f} tokens/s "
                f"(runs {', '.join(f'{x:.0f}' for x in rs)})"
            )
        rates = {name: statistics.median(rs) for name, rs in rates.items()}
        best_hf = max(v for k, v in rates.items() if k.startswith("hf"))
        print(
            f"[{work}] ratio thinkrl_fast / best hf_generate = {rates['thinkrl_fast'] / best_hf:.1f}x "
            f"(vs {hf}: {rates['thinkrl_fast'] / rates[hf]:.1f}x)"
        )
        if work == "fixed":
            fast = engines["thinkrl_fast"]
            sec, rate = linear_floor(fast, B)
            dt = "bf16" if bf16 else "fp32"
            print(
                f"[{work}] floor: the linears of one {B}-row decode step alone take {sec * 1e3:.1f} ms "
                f"({rate:.0f} GFLOP/s): at that matmul rate no {dt} engine exceeds {B / sec:.0f} tokens/s = "
                f"{B / sec / best_hf:.1f}x the best HF; thinkrl reaches {rates['thinkrl_fast'] * sec / B:.0%} of it"
            )
            ceiling = matmul_rate(fast.dtype, 2048, 2048, 2048)
            step_flops = rate * 1e9 * sec  # the decode step's matmul FLOPs
            print(
                f"[{work}] ceiling: {dt} matmul at 2048^3 runs at {ceiling:.0f} GFLOP/s; the decode step's "
                f"matmuls at that rate would allow {B / (step_flops / (ceiling * 1e9)):.0f} tokens/s; thinkrl "
                f"reaches {rates['thinkrl_fast'] * step_flops / (ceiling * 1e9) / B:.0%} of that ceiling "
                f"(its linears alone: {rate / ceiling:.0%})"
            )
    if natural is not None:
        for label, use_bf16 in ((("bf16 autocast (training)", True),) if bf16 else ()) + (("fp32", False),):
            mx, mean = logp_gap(model, tok, natural, use_bf16)
            print(
                f"log-prob gap engine vs training forward [{label}]: max {mx:.4f}, mean {mean:.4f} "
                f"over {sum(len(c) for c in natural.completion_ids)} tokens"
            )
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")


if __name__ == "__main__":
    main()
