"""Two small operations of the decode loop, each way side by side (milliseconds per call):

- the sampling exp over a 64 x 49,152 block of shifted logits, narrow (randn) and wide
  (randn x 30, so many arguments underflow) ranges, plain and with the argument clamped
  at -80 as the engine does;
- repeating a group's prompt cache [8, 3, 265, 64] (bf16) for its 8 samples: advanced
  indexing ``k[rep]``, ``index_select`` and ``repeat_interleave``.

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
        print(f"exp, {label:>18}: plain {ms(lambda: torch.exp(y)):6.2f} ms, "
              f"clamped at -80 {ms(lambda: y.clamp(min=-80.0).exp_()):6.2f} ms "
              f"(share of arguments below -80: {(y < -80).float().mean().item():.2f})")
    k = torch.randn(8, 3, 265, 64, generator=g).bfloat16()
    rep = torch.arange(8).repeat_interleave(8)
    print(f"prompt cache x8: k[rep] {ms(lambda: k[rep]):.2f} ms, index_select {ms(lambda: k.index_select(0, rep)):.2f} ms, "
          f"repeat_interleave {ms(lambda: k.repeat_interleave(8, 0)):.2f} ms")


if __name__ == "__main__":
    main()
