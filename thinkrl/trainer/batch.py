"""From token lists to padded tensors, and from tensors to per-token log-probs.

Layout of a micro-batch (the layout ``generate`` uses)::

    [pad pad p p p p | c c c c EOS pad]
     <- prompt, left-padded P -> <- completion, right-padded T ->

so every completion starts at column P and the logits that predict it are one
column earlier. Only those T columns go through the LM head, so prompt tokens
cost no vocabulary projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from thinkrl.rollout import autocast


@dataclass
class MicroBatch:
    index: Tensor  # [b] rows of the step's batch
    input_ids: Tensor  # [b, P + T]
    attention_mask: Tensor  # [b, P + T]
    prompt_len: int  # P
    mask: Tensor  # [b, T] float, 1.0 on completion tokens


def make_micro_batch(prompts: list[list[int]], completions: list[list[int]], index: list[int],
                     pad_id: int) -> MicroBatch:
    P = max(len(p) for p in prompts)
    T = max(max(len(c) for c in completions), 1)
    ids, attn, mask = [], [], []
    for p, c in zip(prompts, completions):
        lp, rp = P - len(p), T - len(c)
        ids.append([pad_id] * lp + p + c + [pad_id] * rp)
        attn.append([0] * lp + [1] * (len(p) + len(c)) + [0] * rp)
        mask.append([1.0] * len(c) + [0.0] * rp)
    return MicroBatch(index=torch.tensor(index), input_ids=torch.tensor(ids), attention_mask=torch.tensor(attn),
                      prompt_len=P, mask=torch.tensor(mask))


def split_micro_batches(prompts: list[list[int]], completions: list[list[int]], rows: list[int], size: int,
                        pad_id: int) -> list[MicroBatch]:
    """Group ``rows`` into micro-batches of similar length, so little compute goes to padding."""
    order = sorted(rows, key=lambda i: (len(prompts[i]) + len(completions[i]), i))
    out = []
    for s in range(0, len(order), size):
        idx = order[s: s + size]
        out.append(make_micro_batch([prompts[i] for i in idx], [completions[i] for i in idx], idx, pad_id))
    return out


def _backbone_and_head(model):
    inner = getattr(model, model.base_model_prefix, None)
    head = model.get_output_embeddings()
    if inner is None or head is None:
        raise TypeError(f"{type(model).__name__} is not a decoder-only causal LM with an LM head")
    return inner, head


def token_logps(model, mb: MicroBatch, *, temperature: float = 1.0, bf16: bool = False,
                with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probs of the completion tokens under ``model``: [b, T] (fp32), and optionally
    the entropy of the full next-token distribution at each position (detached)."""
    inner, head = _backbone_and_head(model)
    P = mb.prompt_len
    T = mb.mask.shape[1]
    positions = (mb.attention_mask.cumsum(-1) - 1).clamp(min=0)  # [b, P+T]; left padding shifts them
    with autocast(bf16):
        hidden = inner(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                       position_ids=positions).last_hidden_state  # [b, P+T, H]
        logits = head(hidden[:, P - 1: P - 1 + T])  # [b, T, V]
    logits = logits.float() / temperature  # [b, T, V]
    targets = mb.input_ids[:, P: P + T]  # [b, T]
    lse = torch.logsumexp(logits, dim=-1)  # [b, T]
    logp = logits.gather(-1, targets[..., None]).squeeze(-1) - lse  # [b, T]
    entropy = None
    if with_entropy:
        with torch.no_grad():
            probs = torch.softmax(logits, dim=-1)  # [b, T, V]
            entropy = lse - (probs * logits).sum(-1)  # [b, T]
    return logp * mb.mask, entropy
