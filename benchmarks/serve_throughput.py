"""Serving throughput: ``thinkrl serve`` (continuous batching) at concurrency 1, 8 and 32 vs a
sequential HF ``generate`` loop, side by side in one run.

Same model, same prompts (distinct chat-templated questions), same work per request:
greedy decoding of exactly ``--max-tokens`` new tokens (end-of-sequence banned until then:
``min_tokens`` on the server, ``min_new_tokens`` in ``generate``), so that every engine
produces the same number of tokens. HF runs one prompt at a time, the loop a naive server
would run, in the same dtype the server uses. The server is a real ``thinkrl serve``
subprocess; clients are threads posting to ``/v1/completions``, ``c`` requests in flight at
a time. Reported: aggregate tokens/s (all completion tokens / wall time), p50 and p99
request latency, and each line's ratio to the sequential HF loop.

    python benchmarks/serve_throughput.py [--model smollm2-135m] [--prompts 64] [--max-tokens 64]
        [--concurrency 1,8,32] [--dtype auto]
    python benchmarks/serve_throughput.py --quick   # a smoke run on tiny-random
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOPICS = [
    "prime numbers",
    "the moon",
    "photosynthesis",
    "sorting algorithms",
    "the French revolution",
    "volcanoes",
    "bees",
    "compound interest",
]


def prompts(tok, n: int) -> list[str]:
    qs = [f"Question {i}: explain {TOPICS[i % len(TOPICS)]} in {3 + i % 5} sentences." for i in range(n)]
    return [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in qs
    ]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def hf_sequential(model, tok, texts: list[str], m: int, bf16: bool) -> tuple[float, int]:
    """One ``generate`` per prompt, in turn; returns (seconds, new tokens)."""
    if bf16:
        model = model.to(torch.bfloat16)
    ids = tok(texts[0], add_special_tokens=False, return_tensors="pt").input_ids
    with torch.inference_mode():  # warm-up, as the server gets one
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=4,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tok.pad_token_id,
        )
    total, t0 = 0, time.perf_counter()
    for text in texts:
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=m,
                min_new_tokens=m,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tok.pad_token_id,
            )
        total += out.shape[1] - ids.shape[1]
    return time.perf_counter() - t0, total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, dtype: str, slots: int, max_len: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "thinkrl",
            "serve",
            f"model={model}",
            f"port={port}",
            f"dtype={dtype}",
            f"max_slots={slots}",
            f"max_len={max_len}",
        ],
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"thinkrl serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("thinkrl serve did not start")


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=3600) as r:
        return json.loads(r.read())


def serve_run(url: str, model: str, texts: list[str], m: int, concurrency: int) -> dict:
    """All ``texts``, ``concurrency`` requests in flight at a time; tokens, wall time, latencies."""
    todo = list(enumerate(texts))
    lock = threading.Lock()
    lat, tokens = [], []

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                _, text = todo.pop()
            t0 = time.perf_counter()
            r = post(
                url, {"model": model, "prompt": text, "max_tokens": m, "min_tokens": m, "temperature": 0}
            )
            with lock:
                lat.append(time.perf_counter() - t0)
                tokens.append(r["usage"]["completion_tokens"])

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    return {
        "wall": wall,
        "tokens": sum(tokens),
        "requests": len(lat),
        "p50": statistics.median(lat),
        "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument(
        "--quick", action="store_true", help="tiny-random, 8 prompts x 8 tokens, concurrency 1,4,8"
    )
    a = ap.parse_args()
    if a.quick:
        a.model, a.prompts, a.max_tokens, a.concurrency = "tiny-random", 8, 8, "1,4,8"
    levels = [int(c) for c in a.concurrency.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from thinkrl.device import use_bf16
    from thinkrl.models import load_model

    bf16 = use_bf16(a.dtype)
    print(
        f"cpu: {cpu_name()}; torch.backends.cpu.get_cpu_capability(): {torch.backends.cpu.get_cpu_capability()}; "
        f"torch threads: {torch.get_num_threads()}; dtype: {'bf16' if bf16 else 'fp32'}"
    )
    print(f"model {a.model}, {a.prompts} prompts x {a.max_tokens} new tokens each (greedy, fixed length)")
    model, tok = load_model(a.model)
    model.eval()
    texts = prompts(tok, a.prompts)
    longest = max(len(tok(t, add_special_tokens=False).input_ids) for t in texts)
    hf_s, hf_tok = hf_sequential(
        model, tok, texts, a.max_tokens, bf16
    )  # before the server exists: no rival process
    hf_rate = hf_tok / hf_s
    rows = [("HF generate, sequential", hf_s, hf_tok, hf_rate, None, None)]
    del model
    proc, url = start_server(a.model, "bf16" if bf16 else "fp32", max(levels), longest + a.max_tokens + 8)
    try:
        post(url, {"model": a.model, "prompt": texts[0], "max_tokens": 4})  # warm-up
        for c in levels:
            r = serve_run(url, a.model, texts, a.max_tokens, c)
            assert r["requests"] == len(texts), "a request was lost"
            rows.append(
                (
                    f"thinkrl serve, concurrency {c}",
                    r["wall"],
                    r["tokens"],
                    r["tokens"] / r["wall"],
                    r["p50"],
                    r["p99"],
                )
            )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"\n{'engine':<32} {'wall s':>8} {'tokens':>7} {'tok/s':>8} {'x HF':>6} {'p50 s':>7} {'p99 s':>7}")
    for name, s, n, rate, p50, p99 in rows:
        lat = f"{p50:>7.2f} {p99:>7.2f}" if p50 is not None else f"{'':>7} {'':>7}"
        print(f"{name:<32} {s:>8.2f} {n:>7d} {rate:>8.1f} {rate / hf_rate:>6.2f} {lat}")


if __name__ == "__main__":
    main()
