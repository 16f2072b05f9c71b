"""Rollout throughput: thinkrl's fast engine vs HF ``generate``, side by side in one run.

Same model, same prompts, same sampling settings (temperature 1.0, no top-p/top-k),
bf16 where the CPU supports it. Prints new tokens per second for each and the ratio.

    python benchmarks/rollout_throughput.py [--model smollm2-135m] [--prompts 8] [--n 8] [--max-new 128]
"""

from __future__ import annotations

import argparse
import time

import torch

from thinkrl.models import load_model
from thinkrl.rollout import HFEngine, SamplingParams, bf16_supported
from thinkrl.rollout.fast import FastEngine
from thinkrl.tasks.templates import render_prompt
from thinkrl.config import TaskConfig


def run(engine, prompts, n, params, seed):
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    ro = engine.generate(prompts, n, params)
    dt = time.perf_counter() - t0
    tokens = sum(len(c) for c in ro.completion_ids)
    return tokens, dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    model, tok = load_model(args.model)
    model.eval()
    bf16 = bf16_supported()
    import reasoning_gym as rg

    ds = rg.create_dataset("chain_sum", size=args.prompts, seed=7)
    prompts = [render_prompt(ds[i]["question"], tok, TaskConfig())[0] for i in range(args.prompts)]
    params = SamplingParams(max_new_tokens=args.max_new, temperature=1.0)
    engines = {"hf_generate": HFEngine(model, tok, batch_size=args.prompts * args.n, bf16=bf16),
               "thinkrl_fast": FastEngine(model, tok, batch_size=args.prompts * args.n, bf16=bf16)}
    print(f"model={args.model} bf16={bf16} sequences={args.prompts * args.n} max_new_tokens={args.max_new} "
          f"threads={torch.get_num_threads()}")
    rates = {}
    for name, eng in engines.items():
        run(eng, prompts[:1], 2, SamplingParams(max_new_tokens=4), 0)  # warm-up
        toks, secs = 0, 0.0
        for r in range(args.repeats):
            a, b = run(eng, prompts, args.n, params, seed=r)
            toks, secs = toks + a, secs + b
        rates[name] = toks / secs
        print(f"{name:>13}: {toks} new tokens in {secs:.1f} s = {rates[name]:.0f} tokens/s")
    print(f"ratio thinkrl_fast / hf_generate = {rates['thinkrl_fast'] / rates['hf_generate']:.1f}x")


if __name__ == "__main__":
    main()
