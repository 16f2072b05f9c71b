"""The decode step's matmul shapes (smollm2-135m's weights) every way the engine could run them,
side by side: ``F.linear``, ``torch.mm`` on a pre-transposed weight, and each prepacked linear
this CPU has (oneDNN's ``_linear_pointwise`` on a weight reordered once by
``_reorder_linear_weight``, in bf16 and in fp32; MKL's packed sgemm, ``_mkl_linear``, in fp32).

Two tables per dtype and row count:

- per shape, the same weight again and again (it stays in cache): GFLOP/s and the largest
  difference from F.linear;
- one whole decode step's linears, 30 layers with their own weights and the LM head, as the
  engine runs them (weights read from memory each step): milliseconds and GFLOP/s.

    python benchmarks/decode_matmul.py [--rows 64,8] [--dtypes bf16,fp32]
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
LAYER = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # one layer: fused QKV, o, gate/up, down
LAYERS, HEAD = 30, (576, 49152)


def seconds(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def packers(dt: torch.dtype, rows: int) -> dict[str, device.Packer]:
    p = device.plan()
    if dt == torch.bfloat16:
        return {"oneDNN": device.Packer(dt, rows, True)} if p.onednn_prepack else {}
    out = {}
    if p.onednn_fp32_prepack:
        out["oneDNN"] = device.Packer(dt, rows, True)
    if p.mkl_prepack:
        out["MKL"] = device.Packer(dt, rows, False)
    return out


def step_table(name: str, dt: torch.dtype, M: int, pk: dict[str, device.Packer]) -> None:
    """One decode step's linears, every layer with its own weights (read from memory, as in the
    engine), each way."""
    mats = [torch.randn(n, k, dtype=dt) / k**0.5 for _ in range(LAYERS) for k, n in LAYER]
    mats.append(torch.randn(HEAD[1], HEAD[0], dtype=dt) / HEAD[0] ** 0.5)
    wts = [w.t().contiguous() for w in mats]
    xs = {k: torch.randn(M, k, dtype=dt) for k in (576, 1536)}
    flop = sum(2 * M * w.numel() for w in mats)
    steps = {
        "F.linear": lambda: [F.linear(xs[w.shape[1]], w) for w in mats],
        "mm(W^T)": lambda: [torch.mm(xs[w.shape[0]], w) for w in wts],
    }
    for kind, p in pk.items():
        packed = [p.pack(w) for w in mats]
        steps[f"{kind} packed"] = lambda p=p, packed=packed: [
            p.linear(xs[w.shape[1]], w, pw) for w, pw in zip(mats, packed)
        ]
    print(f"{name}, {M} rows, one decode step's linears ({LAYERS} layers + LM head, {flop / 1e9:.2f} GFLOP):")
    times = {way: seconds(fn, reps=5) for way, fn in steps.items()}
    for way, sec in times.items():
        print(
            f"  {way:>14}: {sec * 1e3:7.1f} ms  {flop / sec / 1e9:5.0f} GFLOP/s  "
            f"{times['F.linear'] / sec:4.2f}x F.linear"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="64,8")
    ap.add_argument("--dtypes", default="bf16,fp32")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"CPU: {device.plan().describe()}; threads={torch.get_num_threads()}")
    for name in args.dtypes.split(","):
        dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
        for M in (int(r) for r in args.rows.split(",")):
            pk = packers(dt, M)
            if not pk:
                print(f"{name}: this CPU cannot prepack {name} weights; skipped")
                continue
            ways = ["F.linear", "mm(W^T)", *(f"{k} packed" for k in pk)]
            print(f"\n{name}, {M} rows, one shape at a time (in cache): GFLOP/s, max |diff| from F.linear")
            print(f"{'in x out':>12} " + " ".join(f"{w:>14}" for w in ways))
            for k, n in SHAPES:
                x, w = torch.randn(M, k, dtype=dt), torch.randn(n, k, dtype=dt) / k**0.5
                wt = w.t().contiguous()
                fns = {"F.linear": lambda: F.linear(x, w), "mm(W^T)": lambda: torch.mm(x, wt)}
                for kind, p in pk.items():
                    pw = p.pack(w)
                    fns[f"{kind} packed"] = lambda p=p, pw=pw: p.linear(x, w, pw)
                want = F.linear(x, w).float()
                cells = []
                for way in ways:
                    rate = 2 * M * k * n / seconds(fns[way]) / 1e9
                    diff = (fns[way]().float() - want).abs().max().item()
                    cells.append(f"{rate:>6.0f} ({diff:.0e})")
                print(f"{k:>5} x {n:<5} " + " ".join(f"{c:>14}" for c in cells))
            step_table(name, dt, M, pk)


if __name__ == "__main__":
    main()
