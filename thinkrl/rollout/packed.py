"""Packed completions: all of a micro-batch's completion tokens end to end in one row, with no
padding, for the passes that score given completions (the trainer's policy forward and
backward, and the engine's reference scoring).

RL completions are mostly short with a long tail, so padding a micro-batch to its longest row
makes the linear layers (nearly all of a pass's FLOPs) do 1.5-3x the work of its real tokens.
Packed, they run on exactly the real tokens. Only attention needs to know which token belongs
to which row. Each group's tokens attend to two things:

- its prompt's keys and values, computed once per group;
- causally, the earlier tokens of their own row.

Attention runs one group at a time, over the keys ``[prompt | the group's packed tokens]``,
with a block mask. Its cost grows with a group's tokens squared, a small part of a pass at
these lengths.

Row r's completion tokens ``0 .. len_r - 2`` are the inputs (token t predicts token t + 1); the
prompt's last position predicts token 0. The packed output of row r's input t therefore lands
at column t + 1 of the [b, T] layout. The trainer's :func:`~thinkrl.trainer.batch.completion_hidden`
and the engine's ``score`` use that layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Packed:
    """The layout of ``n`` packed input tokens; see the module docstring."""

    ids: Tensor  # [n] input tokens, row after row (rows in group order)
    pos: Tensor  # [n] their positions: the row's true prompt length + the token's offset
    keep: Tensor  # [b, T - 1] bool: column t + 1 of row r holds a packed token's output
    spans: list[tuple[int, int, int, Tensor]]  # (group, first, end, key mask [end-first, P + end-first])

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        pk: Tensor,
        pv: Tensor,
        *,
        scale: float | None = None,
        eager: bool = True,
    ) -> Tensor:
        """Attention of the packed queries ``q`` [1, nh, n, hd] over their group's prompt keys
        and values ``pk``, ``pv`` [g, nkv, P, hd] and the packed keys and values ``k``, ``v``
        [1, nkv, n, hd] of their own row, up to their own position; returns [1, nh, n, hd].

        ``eager``: plain matmuls and a softmax in fp32 (fp64 for fp64 inputs), whose backward
        beats the fused kernel's on the CPU (``device.train_attention``); otherwise
        ``scaled_dot_product_attention``."""
        nh, hd, nkv = q.shape[1], q.shape[3], k.shape[1]
        rep = nh // nkv  # query heads per key head: head h reads key head h // rep
        scale = hd**-0.5 if scale is None else scale
        outs = []
        for j, a, e, mask in self.spans:
            kj = torch.cat([pk[j], k[0, :, a:e]], 1)  # [nkv, P + m, hd]
            vj = torch.cat([pv[j], v[0, :, a:e]], 1)
            qj = q[0, :, a:e]  # [nh, m, hd]
            m, K = e - a, kj.shape[1]
            if eager:
                s = torch.matmul(qj.reshape(nkv, rep * m, hd), kj.transpose(1, 2)) * scale  # [nkv, rep m, K]
                s = s.view(nkv, rep, m, K).masked_fill(~mask, float("-inf"))
                p = torch.softmax(s.to(torch.promote_types(s.dtype, torch.float32)), -1)  # fp32 at least
                p = p.to(qj.dtype).view(nkv, rep * m, K)
                outs.append(torch.matmul(p, vj).view(nh, m, hd))
            else:
                outs.append(
                    torch.nn.functional.scaled_dot_product_attention(
                        qj[None],
                        kj[None],
                        vj[None],
                        attn_mask=mask[None, None],
                        scale=scale,
                        enable_gqa=rep > 1,
                    )[0]
                )
        return torch.cat(outs, 1)[None]  # [1, nh, n, hd]


def pack_completions(
    c_ids: Tensor, c_mask: Tensor, group: Tensor, prompt_mask: Tensor, start: Tensor
) -> Packed:
    """The packed inputs of right-padded completions ``c_ids`` [b, T] (real where ``c_mask``,
    bool), row r belonging to prompt ``group[r]`` (non-decreasing) whose real key slots are
    ``prompt_mask[group[r]]`` [P] and whose true length is ``start[r]``.

    Needs T > 1 (with T = 1 every row's only token is predicted by its prompt)."""
    b, T = c_ids.shape
    if not bool((group[1:] >= group[:-1]).all()):
        raise ValueError("pack_completions: rows must come in group order")
    keep = c_mask[:, 1:]  # [b, T-1]: input t of row r exists when token t + 1 does
    offs = torch.arange(T - 1, device=c_ids.device).expand(b, T - 1)[keep]  # [n]
    rows = torch.arange(b, device=c_ids.device)[:, None].expand(b, T - 1)[keep]  # [n]
    counts = torch.zeros(prompt_mask.shape[0], dtype=torch.long, device=c_ids.device).index_add_(
        0, group, keep.sum(-1)
    )  # [g] packed tokens per group
    ends = counts.cumsum(0).tolist()
    P = prompt_mask.shape[1]
    spans = []
    for j, (a, e) in enumerate(zip([0, *ends[:-1]], ends)):
        if e == a:
            continue
        r, t = rows[a:e], offs[a:e]
        own = (r[:, None] == r[None, :]) & (t[None, :] <= t[:, None])  # [m, m] same row, not later
        spans.append((j, a, e, torch.cat([prompt_mask[j].expand(e - a, P), own], 1)))
    return Packed(ids=c_ids[:, : T - 1][keep], pos=start[rows] + offs, keep=keep, spans=spans)


PACKABLE = ("llama", "mistral", "qwen2", "qwen3")  # attention through transformers' registry, with kwargs


def packable(config) -> bool:
    """Whether the transformers model of ``config`` can run packed completions: its attention
    is looked up in transformers' registry, so it can be swapped, and it is full causal
    attention (no sliding window, which the packed layout does not apply)."""
    from thinkrl.rollout.fast import sliding_window  # fast imports this module

    return config.model_type in PACKABLE and not sliding_window(config)
