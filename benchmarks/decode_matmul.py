"""The decode step's matmul shapes (64 rows, smollm2-135m's weights) three ways, side by side:
``F.linear``, ``torch.mm`` on a pre-transposed weight, and the rollout engine's prepacked
linear (bf16: oneDNN's ``_linear_pointwise`` on a weight reordered once by
``_reorder_linear_weight``; fp32: MKL's packed sgemm, ``_mkl_linear``). Prints GFLOP/s per
shape and the largest difference from F.linear, in both dtypes where the CPU packs them.

    python benchmarks/decode_matmul.py [--rows 64] [--dtypes bf16,fp32]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from thinkrl import device

# (in, out) of smollm2-135m's decode linears: o_proj, k/v (one of them), down, fused QKV,
# fused gate/up, the LM head.
SHAPES = [(576, 576), (576, 192), (1536, 576), (576, 960), (576, 3072), (576, 49152)]


def seconds(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--dtypes", default="bf16,fp32")
    args = ap.parse_args()
    M = args.rows
    torch.manual_seed(0)
    print(f"CPU: {device.plan().describe()}")
    for name in args.dtypes.split(","):
        dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
        packer = device.packer(dt, M, True)
        if packer is None:
            print(f"{name}: this CPU cannot prepack {name} weights; skipped")
            continue
        print(f"rows={M} threads={torch.get_num_threads()} {name} ({packer.name} prepack); GFLOP/s")
        print(
            f"{'in x out':>12} {'F.linear':>9} {'mm(W^T)':>8} {'prepacked':>10} {'ratio':>6} {'max diff':>9}"
        )
        for k, n in SHAPES:
            x, w = torch.randn(M, k, dtype=dt), torch.randn(n, k, dtype=dt)
            wt, pw = w.t().contiguous(), packer.pack(w)
            flop = 2 * M * k * n
            t_lin = seconds(lambda: F.linear(x, w))
            t_mm = seconds(lambda: torch.mm(x, wt))
            t_pk = seconds(lambda: packer.linear(x, w, pw))
            diff = F.linear(x, w).float() - packer.linear(x, w, pw).float()
            print(
                f"{k:>5} x {n:<5} {flop / t_lin / 1e9:>9.0f} {flop / t_mm / 1e9:>8.0f} {flop / t_pk / 1e9:>10.0f} "
                f"{t_lin / t_pk:>5.2f}x {diff.abs().max().item():>9.3g}"
            )


if __name__ == "__main__":
    main()
