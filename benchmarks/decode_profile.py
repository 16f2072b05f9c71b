"""Where a rollout's time goes: torch.profiler over one fast-engine rollout of the default
task (8 prompts x 8 samples, a fixed number of new tokens), operators sorted by own time.

    python benchmarks/decode_profile.py [--new 64] [--rows 25]
"""

from __future__ import annotations

import argparse

from torch.profiler import ProfilerActivity, profile

from thinkrl.config import Config
from thinkrl.models import load_model
from thinkrl.rollout import SamplingParams, bf16_supported
from thinkrl.rollout.fast import FastEngine
from thinkrl.tasks import build_task
from thinkrl.tasks.templates import render_prompt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--new", type=int, default=64, help="new tokens per sequence (end-of-sequence banned until then)")
    ap.add_argument("--rows", type=int, default=25, help="operators shown")
    args = ap.parse_args()
    model, tok = load_model(args.model)
    model.eval()
    cfg = Config()
    prompts = [render_prompt(e.question, tok, cfg.task)[0] for e in build_task(cfg.task).next_batch(8)]
    engine = FastEngine(model, tok, batch_size=64, bf16=bf16_supported())
    engine.generate(prompts[:1], 2, SamplingParams(max_new_tokens=4))  # warm-up
    params = SamplingParams(max_new_tokens=args.new, temperature=1.0, min_new_tokens=args.new)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.generate(prompts, 8, params)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
