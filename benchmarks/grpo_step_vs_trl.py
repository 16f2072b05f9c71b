"""One GRPO step, thinkrl vs TRL's GRPOTrainer, side by side in one run on this machine.

Same model (smollm2-135m, the plain fp32 copy thinkrl caches), same prompts (the
default task's), same settings: 8 prompts x 8 generations, at most 128 new tokens,
temperature 1.0, beta = 0.04 (so both keep a reference model), one optimizer step per
batch (micro-batches: 16 for TRL, thinkrl's default 32), and one dtype for both: bf16
where the CPU has bf16 instructions that time faster than fp32, fp32 otherwise
(``thinkrl/device.py`` decides; ``--dtype`` overrides; printed). TRL gets its best CPU
settings (no gradient checkpointing).

TRL is not a thinkrl dependency; install it for this benchmark only:

    pip install torch==2.13.0 trl==1.16.0
    python benchmarks/grpo_step_vs_trl.py [--steps 3] [--dtype auto]

It also measures the machine's bf16 and fp32 matmul rates and prints how far thinkrl's
rollout and training stages sit from the matmul limit of the run's dtype, and each side's
peak memory.

Each side runs ``--steps`` steps in its own process (so each one's peak memory is its
own); the first step is a warm-up and is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from thinkrl import device
from thinkrl.perf import matmul_rate

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def prompts_and_examples(n: int):
    from thinkrl.config import Config
    from thinkrl.tasks import build_task

    cfg = Config()
    task = build_task(cfg.task)
    return cfg, task.next_batch(n)


def chat_messages(cfg, question: str) -> list[dict]:
    msgs = [{"role": "system", "content": cfg.task.system_prompt}]
    for shot in cfg.task.fewshot:
        msgs += [
            {"role": "user", "content": shot["question"]},
            {"role": "assistant", "content": shot["response"]},
        ]
    return msgs + [{"role": "user", "content": question}]


def run_trl(steps: int, max_new: int, bf16: bool) -> list[float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from thinkrl.models import load_model, resolve
    from thinkrl.rewards import RewardModel

    cfg, examples = prompts_and_examples(8 * steps)
    by_q = {ex.question: ex for ex in examples}
    rm = RewardModel(cfg.rewards)

    def reward(prompts, completions, **kw):
        qs = [p[-1]["content"] for p in prompts]
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return rm.score(texts, [by_q[q] for q in qs])[0]

    data = Dataset.from_list([{"prompt": chat_messages(cfg, ex.question)} for ex in examples])
    model, tok = load_model("smollm2-135m")
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        # 64 completions per optimizer step in micro-batches of 16 (thinkrl's side uses its default of
        # 32; the loss does not depend on it); one TRL batch of 64 runs out of 24 GB (full-vocabulary
        # logits for prompt and completion of every row).
        args = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=16,
            num_generations=8,
            gradient_accumulation_steps=4,
            max_completion_length=max_new,
            beta=0.04,
            temperature=1.0,
            bf16=bf16,
            use_cpu=True,
            gradient_checkpointing=False,
            loss_type="grpo",
            max_steps=steps,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            learning_rate=1e-5,
            shuffle_dataset=False,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward,
            args=args,
            train_dataset=data,
            processing_class=tok,
            callbacks=[Timer()],
        )
        del resolve
        trainer.train()
    return times


def run_thinkrl(steps: int, max_new: int, bf16: bool) -> tuple[list[float], dict]:
    from thinkrl.config import build_config
    from thinkrl.trainer.rl import build_parts, rl_step

    cfg = build_config(
        overrides=[
            f"max_steps={steps}",
            f"rollout.max_new_tokens={max_new}",
            "rollout.prompts_per_step=8",
            "rollout.group_size=8",
            "rollout.temperature=1.0",
            "algo.kl_coef=0.04",  # micro-batches: thinkrl's default (32 rows)
            "progress=false",
            f"dtype={'bf16' if bf16 else 'fp32'}",
        ]
    )
    p = build_parts(cfg)
    times, last, faults = [], {}, []
    for step in range(1, steps + 1):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        last, _ = rl_step(p, step)
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    last["page_faults"] = faults  # minor faults per step: fresh memory the allocator had to map in
    from thinkrl.tasks.templates import render_prompt

    prompts = [render_prompt(ex.question, p.tok, cfg.task)[0] for ex in p.task.eval[:8]]
    last["prompt_len_mean"] = statistics.mean(len(p.tok(x).input_ids) for x in prompts)
    c = p.model.config
    last["params_body"] = sum(
        q.numel() for n, q in p.model.named_parameters() if "embed" not in n
    )  # no head (tied)
    last["params_head"] = c.vocab_size * c.hidden_size
    return times, last


def roofline(last: dict, rate: float, dt: str) -> None:
    """How far each stage of the last thinkrl step sits from the matmul limit (``rate``
    GFLOP/s, in the run's dtype ``dt``). FLOPs
    count the matmuls only (2 per multiply-add; backward = 2x forward; attention left out,
    under 5% at these lengths): rollout = prompts once + every generated token; training =
    policy forward+backward + reference forward over prompts once per group + completions."""
    G, N = 8, last["generated_seqs"]
    P, L = last["prompt_len_mean"], last["response_len_mean"]
    body, head = last["params_body"], last["params_head"]
    tokens = (N / G) * P + N * L  # prompt once per group, completions per row
    rollout = 2 * body * tokens + 2 * head * (N * L)
    train = 4 * (2 * body * tokens + 2 * head * N * L)  # policy fwd + bwd (3x) and reference fwd (1x)
    for name, flops, secs in (
        ("rollout", rollout, last["time_generate"]),
        ("training", train, last["time_train"]),
    ):
        limit = flops / (rate * 1e9)
        print(
            f"  {name:>8}: {flops / 1e12:.2f} TFLOP -> {limit:.1f} s at the {dt} matmul rate; measured "
            f"{secs:.1f} s = {secs / limit:.1f}x the limit ({flops / secs / 1e9:.0f} GFLOP/s achieved)"
        )


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def side(name: str, steps: int, max_new: int, dtype: str) -> dict:
    """Run one side in a fresh process and return its step times and peak memory."""
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--side",
            name,
            "--steps",
            str(steps),
            "--max-new",
            str(max_new),
            "--dtype",
            dtype,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    if out.returncode != 0:
        raise SystemExit(f"{name} side failed (exit {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bf16", "fp32"],
        help="both sides' dtype; auto: bf16 where the CPU has it natively and it times faster, else fp32",
    )
    ap.add_argument("--side", choices=["thinkrl", "trl"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    bf16 = device.use_bf16(args.dtype)
    dt = "bf16" if bf16 else "fp32"
    if args.side == "thinkrl":
        times, last = run_thinkrl(args.steps, args.max_new, bf16)
        last["bf16_gflops"] = matmul_rate(torch.bfloat16, 2048, 2048, 2048)
        last["fp32_gflops"] = matmul_rate(torch.float32, 2048, 2048, 2048)
        last["gflops_decode"] = matmul_rate(torch.bfloat16 if bf16 else torch.float32, 64, 576, 1536)
        print(json.dumps({"times": times, "last": last, "peak_rss_gb": peak_rss_gb()}))
        return
    if args.side == "trl":
        print(json.dumps({"times": run_trl(args.steps, args.max_new, bf16), "peak_rss_gb": peak_rss_gb()}))
        return
    print(f"CPU: {device.plan().describe()}")
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')} torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"8 prompts x 8 generations, <= {args.max_new} new tokens, beta 0.04, {dt} on both sides",
        flush=True,
    )
    ours = side("thinkrl", args.steps, args.max_new, dt)
    ours_mean = statistics.mean(ours["times"][1:] or ours["times"])
    last = ours["last"]
    print(
        f"thinkrl: step times {[round(t, 1) for t in ours['times']]} s -> {ours_mean:.1f} s/step "
        f"(last step: generate {last['time_generate']:.1f} s, train {last['time_train']:.1f} s, "
        f"mean length {last['response_len_mean']:.0f}); peak RSS {ours['peak_rss_gb']:.2f} GB; "
        f"minor page faults per step {last['page_faults']}",
        flush=True,
    )
    print(
        f"machine: bf16 matmul {last['bf16_gflops']:.0f} GFLOP/s, fp32 {last['fp32_gflops']:.0f} GFLOP/s "
        f"(2048^3); {dt} at a decode shape (64x576 @ 576x1536) {last['gflops_decode']:.0f} GFLOP/s"
    )
    roofline(last, last[f"{dt}_gflops"], dt)
    if args.skip_trl:
        return
    trl = side("trl", args.steps, args.max_new, dt)
    trl_mean = statistics.mean(trl["times"][1:] or trl["times"])
    print(
        f"TRL GRPOTrainer: step times {[round(t, 1) for t in trl['times']]} s -> {trl_mean:.1f} s/step; "
        f"peak RSS {trl['peak_rss_gb']:.2f} GB"
    )
    print(f"ratio TRL / thinkrl = {trl_mean / ours_mean:.1f}x")


if __name__ == "__main__":
    main()
