"""Decode attention of one layer, side by side: the engine's torch-ops cascade path and its C
kernel (thinkrl/rollout/decode_attention.c), at the default rollout's shapes: 8 prompts of
137 tokens x 8 samples, smollm2's 3 key heads x 3 query heads of 64, and generated slot t
of 128 (milliseconds per call, median of 200; the C kernel with 1 and with all threads).
``THINKRL_KERNEL_MARCH=haswell`` times an AVX2-only build of the kernel; ``--dtype fp32``
times both on fp32 caches (the engine's fp32 path).

    python benchmarks/decode_attention.py [--t 64] [--dtype bf16|fp32]
"""

from __future__ import annotations

import argparse
import time

import torch

from thinkrl.rollout.fast import _cascade_attention, _DecodeState
from thinkrl.rollout.kernels import _march, decode_attention, decode_attention_kernel


def median_ms(fn, reps: int = 200) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[reps // 2] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--t", type=int, default=64, help="generated slot (tokens generated so far)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    args = ap.parse_args()
    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    g, n, nkv, rep, hd, P, T, t = 8, 8, 3, 3, 64, 137, 128, args.t
    b = g * n
    gen = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(dt)

    st = _DecodeState(
        groups=g,
        n=n,
        rep=rep,
        caches=[],
        bias=torch.zeros(1, b, 1, P + T),
        pstart=torch.zeros(g, dtype=torch.long),
        alive=torch.arange(b),
        group=torch.arange(g).repeat_interleave(n),
        t=t,
    )
    cache = [r(nkv, g, hd, P), r(nkv, g, P, hd), r(nkv, b, hd, T), r(nkv, b, T, hd)]
    qkv = r(b, (nkv * rep + 2 * nkv) * hd)
    q, k, v = (
        qkv[:, : nkv * rep * hd],
        qkv[:, nkv * rep * hd : (nkv * rep + nkv) * hd],
        qkv[:, (nkv * rep + nkv) * hd :],
    )
    torch_ms = median_ms(
        lambda: _cascade_attention(
            q.reshape(b, -1, hd), k.reshape(b, nkv, hd), v.reshape(b, nkv, hd), cache, st
        )
    )
    print(
        f"threads={torch.get_num_threads()} rows={b} prompt={P} t={t} torch path on {args.dtype} caches, "
        f"C kernel built for -march={_march()}"
    )
    print(f"torch ops (cascade): {torch_ms:.3f} ms")
    fn = decode_attention_kernel()
    if fn is None:
        print("C kernel: not available on this machine")
        return
    out = torch.empty(b, nkv * rep * hd, dtype=dt)
    threads = torch.get_num_threads()
    for nt in sorted({1, threads}):
        torch.set_num_threads(nt)
        ms = median_ms(lambda: decode_attention(fn, q, k, v, *cache, st.group, st.pstart, t, out))
        print(f"C kernel, {nt} thread(s): {ms:.3f} ms ({torch_ms / ms:.1f}x the torch path)")
    torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
