"""The sampling step's full-vocabulary operations, each way side by side (milliseconds per
call, 64 x 49,152 fp32 logits, median of 30):

- the exponential: ``exp`` and ``exp2`` (the engine works in base 2), on a narrow (randn)
  and a wide (randn x 30, so many arguments underflow) range of shifted logits, each
  plain and with the argument clamped as the engine does (-80 nats = -115 in base 2);
- the draw's cumulative distribution: a full-vocabulary ``cumsum`` against the block sums
  (256 tokens per block) that the engine's two-level search uses instead.

    python benchmarks/decode_small_ops.py
"""

from __future__ import annotations

import torch
from decode_matmul import seconds  # the benchmarks folder is on sys.path when run as a script


def ms(fn) -> float:
    return seconds(fn, reps=30) * 1e3


def main() -> None:
    g = torch.Generator().manual_seed(0)
    print(f"threads={torch.get_num_threads()}")
    for label, scale in (("narrow (randn)", 1.0), ("wide (randn x 30)", 30.0)):
        x = torch.randn(64, 49152, generator=g) * scale
        y = x - x.amax(-1, keepdim=True)
        y2 = y * 1.4426950408889634
        print(
            f"{label:>18}: exp {ms(lambda: torch.exp(y)):6.2f} ms, exp clamped {ms(lambda: y.clamp(min=-80.0).exp_()):6.2f}"
            f" | exp2 {ms(lambda: torch.exp2(y2)):6.2f} ms, exp2 clamped {ms(lambda: y2.clamp(min=-115.0).exp2_()):6.2f}"
            f" (arguments below -80 nats: {(y < -80).float().mean().item():.2f})"
        )
    p = torch.rand(64, 49152, generator=g)
    print(
        f"cumulative sum over the vocabulary {ms(lambda: p.cumsum(-1)):.2f} ms, "
        f"sums of 256-token blocks {ms(lambda: p.view(64, 192, 256).sum(-1)):.2f} ms"
    )


if __name__ == "__main__":
    main()
