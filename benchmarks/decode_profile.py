"""Where a decode step's time goes: one fast-engine rollout of the default task (8 prompts x 8
samples, a fixed number of new tokens, so every step has 64 rows), with wall-clock timers
around the engine's parts (no profiler: torch.profiler's own overhead distorts steps of
~100 small operators). Milliseconds per decode step, medians over two rollouts' steps:

- each linear layer kind (fused QKV, output projection, gate/up, down, LM head), all layers;
- decode attention (the C kernel, or the torch-ops path with ``--torch-attention``);
- RMSNorm; sampling (from fp32 logits to tokens and log-probs);
- the rest of the step (embedding, RoPE, SiLU, residual adds, dtype conversions).

    python benchmarks/decode_profile.py [--new 128] [--torch-attention]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch.nn.functional as F

import thinkrl.rollout.fast as fast
from thinkrl import device
from thinkrl.config import Config
from thinkrl.models import load_model
from thinkrl.rollout import SamplingParams
from thinkrl.tasks import build_task
from thinkrl.tasks.templates import render_prompt

spent: dict[str, float] = defaultdict(float)
in_step = [False]  # count the parts only inside decode steps (the prefill calls the same linears)


def timed(fn, label, always: bool = False):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        if in_step[0] or always:
            spent[label(*args) if callable(label) else label] += time.perf_counter() - t0
        return out

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument(
        "--new", type=int, default=128, help="new tokens per sequence (end-of-sequence banned until then)"
    )
    ap.add_argument(
        "--torch-attention", action="store_true", help="decode attention on torch ops, not the C kernel"
    )
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    args = ap.parse_args()
    print(f"CPU: {device.plan().describe()}")
    model, tok = load_model(args.model)
    model.eval()
    cfg = Config()
    prompts = [render_prompt(e.question, tok, cfg.task)[0] for e in build_task(cfg.task).next_batch(8)]
    engine = fast.FastEngine(
        model,
        tok,
        batch_size=64,
        bf16=device.use_bf16(args.dtype),
        kernel=False if args.torch_attention else None,
    )
    engine.sync()
    names = {engine.head.shape: "linear: LM head"}
    L0 = engine.layers[0]
    names.update(
        {
            L0.wqkv.shape: "linear: fused QKV",
            L0.wo.shape: "linear: output projection",
            L0.wgu.shape: "linear: gate/up",
            L0.wd.shape: "linear: down",
        }
    )
    engine._linear = timed(engine._linear, lambda x, w, *a: names.get(w.shape, "linear: other"))
    fast.decode_attention = timed(fast.decode_attention, "decode attention")
    fast._cascade_attention = timed(fast._cascade_attention, "decode attention")
    F.rms_norm = timed(F.rms_norm, "RMSNorm")
    fast.FastEngine._sample = staticmethod(timed(fast.FastEngine._sample, "sampling", always=True))
    steps: list[float] = []
    step = fast.FastEngine._decode_step

    def timed_step(self, *a):
        in_step[0] = True
        t0 = time.perf_counter()
        out = step(self, *a)
        steps.append(time.perf_counter() - t0)
        in_step[0] = False
        return out

    fast.FastEngine._decode_step = timed_step

    engine.generate_text(prompts[:1], 2, SamplingParams(max_new_tokens=4))  # warm-up
    params = SamplingParams(max_new_tokens=args.new, temperature=1.0, min_new_tokens=args.new)
    per_run = []
    for seed in (0, 1):
        spent.clear()
        steps.clear()
        fast.torch.manual_seed(seed)
        engine.generate_text(prompts, 8, params)
        n = len(steps)
        sampling_outside = spent["sampling"]  # _sample runs outside _decode_step
        parts = {k: v / n for k, v in spent.items()}
        parts["rest of the step"] = (sum(steps) - (sum(spent.values()) - sampling_outside)) / n
        parts["step (all of the above but sampling)"] = sum(steps) / n
        per_run.append(parts)
    print(
        f"{'bf16' if engine.dtype == fast.torch.bfloat16 else 'fp32'} engine, decode attention: "
        f"{'C kernel' if engine.kernel is not None else 'torch ops'}; "
        f"{len(steps)} steps of 64 rows per rollout; ms per step (rollout 1, rollout 2)"
    )
    for k in sorted(per_run[0], key=lambda k: -per_run[0][k]):
        vals = [r.get(k, 0.0) * 1e3 for r in per_run]
        print(f"  {k:>38}: {statistics.mean(vals):6.1f}  ({', '.join(f'{v:.1f}' for v in vals)})")


if __name__ == "__main__":
    main()
