"""The training side of one GRPO step with packed completions, against the same rows run in
full, side by side in one run: the policy's forward and backward, and the KL reference's
scoring by the frozen engine.

The batch is the one `grpo_step_vs_trl.py` trains: the default task's prompts, 8 groups of 8
completions, in micro-batches of 32 rows. The completion lengths are those of one step of
that benchmark (2026-12-04, mean 33 tokens, longest 128); the tokens are random, which
changes nothing about the time. Three layouts of the same rows:

- **packed** (the trainer's): each prompt once, then every real completion token end to end
  in one row (thinkrl/rollout/packed.py);
- **full rows**: every row padded to the micro-batch's longest, its prompt repeated (the
  path a model that cannot pack takes, and activation checkpointing);
- the **reference**: the frozen engine's ``score`` on the packed layout.

    python benchmarks/packed_training.py [--repeats 2] [--dtype auto]

It prints the minimum over ``--repeats`` of each, the ratio, the tokens each layout computes,
and the machine's matmul rate at 2048^3 in the run's dtype.
"""

from __future__ import annotations

import argparse
import time

import torch

from thinkrl import device
from thinkrl.config import Config
from thinkrl.models import load_model
from thinkrl.perf import matmul_rate
from thinkrl.rollout import build_scorer
from thinkrl.tasks import build_task
from thinkrl.tasks.templates import render_prompt
from thinkrl.trainer.batch import make_micro_batch, split_grouped_micro_batches, token_logps

# One step's completion lengths (grpo_step_vs_trl.py, 2026-12-04 04:0x UTC), group by group.
LENGTHS = [
    [21, 24, 15, 18, 9, 20, 27, 41],
    [21, 43, 21, 11, 25, 49, 34, 13],
    [71, 23, 15, 38, 13, 35, 23, 23],
    [27, 39, 9, 11, 76, 25, 26, 20],
    [14, 8, 13, 12, 21, 21, 21, 97],
    [23, 37, 16, 11, 128, 21, 66, 44],
    [17, 25, 81, 61, 12, 99, 128, 7],
    [23, 35, 128, 27, 27, 29, 12, 17],
]


def batch(tok, cfg: Config):
    task = build_task(cfg.task)
    prompts = [tok(render_prompt(ex.question, tok, cfg.task)[0]).input_ids for ex in task.eval[:8]]
    g = torch.Generator().manual_seed(0)
    rows_prompts, comps = [], []
    for p, lengths in zip(prompts, LENGTHS):
        for n in lengths:
            rows_prompts.append(p)
            comps.append(torch.randint(100, 40000, (n,), generator=g).tolist())
    G = len(LENGTHS[0])
    grouped = split_grouped_micro_batches(
        rows_prompts, comps, list(range(len(prompts))), G, 32, tok.pad_token_id
    )
    full = [
        make_micro_batch(
            [rows_prompts[i] for i in mb.index],
            [comps[i] for i in mb.index],
            mb.index.tolist(),
            tok.pad_token_id,
        )
        for mb in grouped
    ]
    return grouped, full


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    args = ap.parse_args()
    device.setup("cpu")
    bf16 = device.use_bf16(args.dtype)
    dt = "bf16" if bf16 else "fp32"
    cfg = Config()
    model, tok = load_model(cfg.model)
    model.float().train().set_attn_implementation(device.train_attention("cpu"))
    grouped, full = batch(tok, cfg)
    print(f"CPU: {device.plan().describe()}")
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')} torch {torch.__version__}, threads {torch.get_num_threads()}, {dt}; "
        f"{sum(len(mb.index) for mb in grouped)} rows in {len(grouped)} micro-batches"
    )

    def train(mbs):
        def run():
            for mb in mbs:
                model.zero_grad(set_to_none=True)
                logp, _ = token_logps(model, mb, bf16=bf16)
                logp.sum().backward()

        return run

    real = sum(int(mb.mask.sum()) for mb in grouped)
    padded = sum(mb.mask.numel() for mb in full)
    prompt = sum(int(mb.prompt_mask.sum()) for mb in grouped)
    print(
        f"completion tokens: {real} real; full rows pad them to {padded} and repeat the prompts "
        f"({sum(int(mb.attention_mask[:, : mb.prompt_len].sum()) for mb in full)} prompt tokens against {prompt})"
    )
    t_packed = best_of(args.repeats, train(grouped))
    t_full = best_of(args.repeats, train(full))
    print(
        f"policy forward + backward: packed {t_packed:.2f} s, full rows {t_full:.2f} s -> {t_full / t_packed:.2f}x"
    )
    scorer = build_scorer("fast", model, tok, bf16=bf16)
    t_ref = best_of(args.repeats, lambda: [scorer.score(mb) for mb in grouped])
    with torch.no_grad():
        t_nograd = best_of(args.repeats, lambda: [token_logps(model, mb, bf16=bf16) for mb in grouped])
    print(
        f"reference scoring: frozen engine, packed {t_ref:.2f} s; the training forward without autograd, "
        f"packed {t_nograd:.2f} s"
    )
    rate = matmul_rate(torch.bfloat16 if bf16 else torch.float32, 2048, 2048, 2048)
    print(f"machine: {dt} matmul {rate:.0f} GFLOP/s (2048^3)")


if __name__ == "__main__":
    main()
