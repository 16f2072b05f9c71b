"""From token lists to padded tensors, and from tensors to per-token log-probs.

Layout of a micro-batch (the layout ``generate`` uses)::

    [pad pad p p p p | c c c c EOS pad]
     <- prompt, left-padded P -> <- completion, right-padded T ->

so every completion starts at column P and the logits that predict it are one
column earlier. Only those T columns go through the LM head, so prompt tokens
cost no vocabulary projection.

Grouped micro-batches go further: the G completions of one prompt share it, so
the prompt is run once per group (and a prefix that every prompt shares, once), and
each completion attends to its group's prompt keys/values (gradients flow back
through them into the one prompt pass). The completions then run packed: all their
real tokens end to end in one row, with no padding (thinkrl/rollout/packed.py), so
one long sample does not pad the others. The result is the same as running every row
in full, at 1/G of the prompt cost (with a long system prompt and few-shot turns, the
prompt is most of the tokens) and none of the padding's.

Grouped micro-batches run their full rows instead (same result, full cost) under
activation checkpointing (``optim.gradient_checkpointing``: the layers refuse a cache
in training mode), and for a model that cannot swap its attention for the packed one
(:func:`~thinkrl.rollout.packed.packable`: another architecture, or a sliding window).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from thinkrl import device
from thinkrl.distributed.torch_dist import even_passes, fsdp_root
from thinkrl.rollout import shared_prefix_len
from thinkrl.rollout.packed import pack_completions, packable


@dataclass
class MicroBatch:
    index: Tensor  # [b] rows of the step's batch
    input_ids: Tensor  # [b, P + T]
    attention_mask: Tensor  # [b, P + T]
    prompt_len: int  # P
    mask: Tensor  # [b, T] float, 1.0 on completion tokens
    group_size: int = 1  # G > 1: rows come in groups of G sharing one prompt
    prompt_ids: Tensor | None = None  # [b / G, P] the groups' prompts, left-padded
    prompt_mask: Tensor | None = None  # [b / G, P]

    def to(self, dev) -> MicroBatch:
        """The micro-batch with its model inputs on ``dev`` (``index`` stays on the CPU, with the
        step's [N, T] tensors it indexes); itself where they already are."""
        if self.input_ids.device == torch.device(dev):
            return self
        move = {
            k: device.to(getattr(self, k), dev) if getattr(self, k) is not None else None
            for k in ("input_ids", "attention_mask", "mask", "prompt_ids", "prompt_mask")
        }
        return MicroBatch(index=self.index, prompt_len=self.prompt_len, group_size=self.group_size, **move)


def policy_token_mask(ro, T: int) -> Tensor:
    """[N, T] 1.0 where a completion token is the policy's own: all of them in a single-turn
    rollout; in a multi-turn one (``ro.loss_mask``), not the environment's observation tokens,
    which the loss never trains on. Padding is the caller's to mask (its columns here are 1)."""
    N = len(ro.completion_ids)
    out = torch.ones(N, T)
    for i, m in enumerate(ro.loss_mask or []):
        out[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
    return out


def make_micro_batch(
    prompts: list[list[int]], completions: list[list[int]], index: list[int], pad_id: int
) -> MicroBatch:
    P = max(len(p) for p in prompts)
    T = max(max(len(c) for c in completions), 1)
    ids, attn, mask = [], [], []
    for p, c in zip(prompts, completions):
        lp, rp = P - len(p), T - len(c)
        ids.append([pad_id] * lp + p + c + [pad_id] * rp)
        attn.append([0] * lp + [1] * (len(p) + len(c)) + [0] * rp)
        mask.append([1.0] * len(c) + [0.0] * rp)
    return MicroBatch(
        index=torch.tensor(index),
        input_ids=torch.tensor(ids),
        attention_mask=torch.tensor(attn),
        prompt_len=P,
        mask=torch.tensor(mask),
    )


def make_grouped_micro_batch(
    prompts: list[list[int]], completions: list[list[int]], index: list[int], group_size: int, pad_id: int
) -> MicroBatch:
    """``prompts`` has one entry per group; ``completions`` and ``index`` have G per group."""
    P = max(len(p) for p in prompts)
    T = max(max(len(c) for c in completions), 1)
    p_ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts])  # [g, P]
    p_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])  # [g, P]
    c_ids = torch.tensor([c + [pad_id] * (T - len(c)) for c in completions])  # [g*G, T]
    c_mask = torch.tensor([[1] * len(c) + [0] * (T - len(c)) for c in completions])  # [g*G, T]
    rep_ids = p_ids.repeat_interleave(group_size, 0)  # [g*G, P]
    rep_mask = p_mask.repeat_interleave(group_size, 0)  # [g*G, P]
    return MicroBatch(
        index=torch.tensor(index),
        input_ids=torch.cat([rep_ids, c_ids], 1),
        attention_mask=torch.cat([rep_mask, c_mask], 1),
        prompt_len=P,
        mask=c_mask.float(),
        group_size=group_size,
        prompt_ids=p_ids,
        prompt_mask=p_mask,
    )


def split_grouped_micro_batches(
    prompts: list[list[int]],
    completions: list[list[int]],
    groups: list[int],
    group_size: int,
    size: int,
    pad_id: int,
) -> list[MicroBatch]:
    """Micro-batches of whole groups (row ``g*G + j`` is sample j of group g), about ``size`` rows each."""
    G = group_size
    per = max(1, size // G)
    order = sorted(
        groups, key=lambda g: (len(prompts[g * G]) + max(len(completions[g * G + j]) for j in range(G)), g)
    )
    out = []
    for s in range(0, len(order), per):
        gs = order[s : s + per]
        rows = [g * G + j for g in gs for j in range(G)]
        out.append(
            make_grouped_micro_batch(
                [prompts[g * G] for g in gs], [completions[i] for i in rows], rows, G, pad_id
            )
        )
    return out


def fill_rows(mbs: list[MicroBatch], N: int, T: int, per_mb) -> Tensor:
    """The step tensor [N, T] whose rows ``mb.index`` hold ``per_mb(mb)`` [b, T'] for each
    micro-batch in ``mbs``, zero elsewhere (padding, rows in no micro-batch). It lives on the CPU,
    with the step's other [N, T] tensors, whatever device ``per_mb`` computes on."""
    out = torch.zeros(N, T)
    for mb in mbs:
        out[mb.index, : mb.mask.shape[1]] = per_mb(mb).to(out.device)
    return out


def logps_of(model, mbs: list[MicroBatch], N: int, T: int, *, temperature: float, bf16: bool) -> Tensor:
    """Log-probs [N, T] of every row in ``mbs`` under ``model``, without gradients. A sharded
    policy's ranks run as many passes each (:func:`~thinkrl.distributed.torch_dist.even_passes`)."""
    with torch.no_grad():
        return fill_rows(
            even_passes(model, mbs),
            N,
            T,
            lambda mb: token_logps(model, mb, temperature=temperature, bf16=bf16)[0],
        )


def split_micro_batches(
    prompts: list[list[int]], completions: list[list[int]], rows: list[int], size: int, pad_id: int
) -> list[MicroBatch]:
    """Group ``rows`` into micro-batches of similar length, so little compute goes to padding."""
    order = sorted(rows, key=lambda i: (len(prompts[i]) + len(completions[i]), i))
    out = []
    for s in range(0, len(order), size):
        idx = order[s : s + size]
        out.append(make_micro_batch([prompts[i] for i in idx], [completions[i] for i in idx], idx, pad_id))
    return out


def _backbone_and_head(model):
    """The decoder stack and the LM head of a causal LM. A peft (LoRA) model is unwrapped
    first: its adapters live inside the base model's linears, so they still apply."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    inner = getattr(model, model.base_model_prefix, None)
    head = model.get_output_embeddings()
    if inner is None or head is None:
        raise TypeError(f"{type(model).__name__} is not a decoder-only causal LM with an LM head")
    return inner, head


def completion_hidden(inner, mb: MicroBatch) -> Tensor:
    """Hidden states [b, T, H] at the positions that predict each completion token, i.e. of the
    state s_t before token t (the policy's logits and the critic's values both read them)."""
    P = mb.prompt_len
    T = mb.mask.shape[1]
    mb = mb.to(inner.get_input_embeddings().weight.device)
    if mb.prompt_ids is not None and mb.group_size > 1 and packable(inner.config) and not _drops_cache(inner):
        return _grouped_hidden(inner, mb)  # [b, T, H]
    # Full rows: a grouped micro-batch holds them too (input_ids repeat each prompt G times).
    positions = (mb.attention_mask.cumsum(-1) - 1).clamp(min=0)  # [b, P+T]; left padding shifts them
    return inner(
        input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=positions
    ).last_hidden_state[:, P - 1 : P - 1 + T]  # [b, T, H]


def token_logps(
    model,
    mb: MicroBatch,
    *,
    temperature: float = 1.0,
    bf16: bool = False,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of the completion tokens under ``model``: [b, T] (fp32, zero on padding), and
    optionally the entropy of the full next-token distribution at each position (detached
    unless ``entropy_grad``, which an entropy bonus needs).

    Only the real completion tokens go through the LM head, in chunks, by
    :class:`HeadLogProbs`: no [b, T, V] logits tensor is ever built."""
    kw = dict(temperature=temperature, bf16=bf16, with_entropy=with_entropy, entropy_grad=entropy_grad)
    root = fsdp_root(model)  # a sharded policy: all of it inside its FSDP root's forward
    return root(_token_logps, mb, **kw) if root is not None else _token_logps(model, mb, **kw)


def _token_logps(model, mb: MicroBatch, *, temperature, bf16, with_entropy, entropy_grad):
    inner, head = _backbone_and_head(model)
    mb = mb.to(head.weight.device)
    P = mb.prompt_len
    T = mb.mask.shape[1]
    with device.autocast(bf16, head.weight.device):
        hidden = completion_hidden(inner, mb)  # [b, T, H]
    keep = mb.mask.bool()  # [b, T]
    targets = mb.input_ids[:, P : P + T][keep]  # [n] the n real completion tokens
    if getattr(head, "bias", None) is not None or not isinstance(head, torch.nn.Linear):
        raise TypeError(f"{type(model).__name__}: the LM head must be a bias-free nn.Linear")
    want_ent = with_entropy or entropy_grad
    logp, ent = HeadLogProbs.apply(
        hidden[keep], head.weight, targets, temperature, bf16, want_ent
    )  # [n] each
    zeros = hidden.new_zeros(keep.shape, dtype=logp.dtype)  # [b, T]
    entropy = None
    if want_ent:
        entropy = zeros.masked_scatter(
            keep, ent if entropy_grad and torch.is_grad_enabled() else ent.detach()
        )
    return zeros.masked_scatter(keep, logp), entropy


class HeadLogProbs(torch.autograd.Function):
    """log softmax(h W^T / temperature)[target] and the entropy of that softmax, for n
    positions, computed ``CHUNK`` positions at a time; the backward pass recomputes each
    chunk's logits instead of keeping them (the vocabulary is ~50-150k wide, so [n, V]
    fp32 logits are the largest tensor of a step by far).

    With z = h W^T / t, p = softmax(z), lse = log sum exp z, H = -sum p log p:
      d logp[y] / dz = onehot(y) - p,      dH / dz = -p (log p + H),
    and dz/dh = W / t, dz/dW = h / t. The matmuls run in bf16 when ``bf16`` (as under
    autocast), the softmax algebra in fp32 (all of it in fp64 for an fp64 model).
    """

    CHUNK = 128  # positions per chunk: [128, V] fp32 logits stay under glibc's 32 MB mmap limit

    @staticmethod
    def forward(
        ctx, h: Tensor, weight: Tensor, targets: Tensor, temperature: float, bf16: bool, with_entropy: bool
    ):
        n = h.shape[0]
        w = weight.detach().to(HeadLogProbs._matmul_dtype(weight, bf16))  # [V, H]
        acc = torch.promote_types(w.dtype, torch.float32)  # fp32, or fp64 for an fp64 model
        logp, lse, ent = (torch.zeros(n, device=h.device, dtype=acc) for _ in range(3))  # [n] each
        for s in range(0, n, HeadLogProbs.CHUNK):
            e = min(n, s + HeadLogProbs.CHUNK)
            z = HeadLogProbs._logits(h[s:e], w, temperature)  # [c, V] fp32 (fp64)
            lse[s:e] = torch.logsumexp(z, -1)
            logp[s:e] = z.gather(-1, targets[s:e, None]).squeeze(-1) - lse[s:e]
            if with_entropy:
                z.sub_(lse[s:e, None])  # log p
                ent[s:e] = -(z.exp() * z).sum(-1)
        ctx.save_for_backward(h, weight, targets, lse, ent)
        ctx.temperature, ctx.bf16, ctx.with_entropy = temperature, bf16, with_entropy
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def _matmul_dtype(weight: Tensor, bf16: bool) -> torch.dtype:
        """bf16 under autocast, else fp32 (fp64 for an fp64 model, the tests' exact reference)."""
        return torch.bfloat16 if bf16 else torch.promote_types(weight.dtype, torch.float32)

    @staticmethod
    def _logits(h: Tensor, w: Tensor, temperature: float) -> Tensor:
        z = torch.matmul(h.to(w.dtype), w.t())  # [c, V]
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        return z.div_(temperature) if temperature != 1.0 else z

    @staticmethod
    def backward(ctx, g_logp: Tensor, g_ent: Tensor):
        h, weight, targets, lse, ent = ctx.saved_tensors
        t = ctx.temperature
        w = weight.detach().to(HeadLogProbs._matmul_dtype(weight, ctx.bf16))  # [V, H]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = h.shape[0]
        gz_all = torch.empty(
            n, w.shape[0], dtype=w.dtype, device=w.device
        )  # [n, V] d loss / d logits, filled chunk by chunk
        use_ent = ctx.with_entropy and g_ent is not None and bool(g_ent.abs().sum() > 0)
        for s in range(0, n, HeadLogProbs.CHUNK):
            e = min(n, s + HeadLogProbs.CHUNK)
            logp_all = HeadLogProbs._logits(h[s:e], w, t).sub_(lse[s:e, None])  # [c, V] log p
            p = logp_all.exp()  # [c, V]
            if use_ent:
                # dH/dz = -p (log p + H); logp_all becomes the combined gradient's -p factor
                gz = logp_all.add_(ent[s:e, None]).mul_(p).mul_(-g_ent[s:e, None])
                gz.sub_(p * g_logp[s:e, None])
            else:
                gz = p.mul_(-g_logp[s:e, None])  # -p * g
            gz[torch.arange(e - s, device=gz.device), targets[s:e]] += g_logp[s:e]  # + onehot(y) * g
            if t != 1.0:
                gz.div_(t)
            gz_all[s:e] = gz
        # One matmul each over all chunks: per-chunk [V, H] partial sums would be large
        # temporaries, and summing them into fp32 costs more than the products.
        grad_h = torch.matmul(gz_all, w).to(h.dtype) if need_h else None  # [n, H]
        grad_w = torch.matmul(gz_all.t(), h.to(w.dtype)).to(weight.dtype) if need_w else None  # [V, H]
        return grad_h, grad_w, None, None, None, None


def _drops_cache(inner) -> bool:
    """True when the decoder layers would ignore a KV cache: transformers' checkpointed layers
    drop ``past_key_values`` in training mode (a recompute must not write the cache twice),
    which would leave the grouped path's completions blind to their prompt."""
    return inner.training and any(getattr(m, "gradient_checkpointing", False) for m in inner.modules())


def _grouped_hidden(inner, mb: MicroBatch) -> Tensor:
    """Hidden states that predict each completion token, running each prompt once, then all
    the completions packed in one pass, with no padding (thinkrl/rollout/packed.py), each
    attending to its group's prompt keys/values."""
    G, P = mb.group_size, mb.prompt_len
    last, prompt_kv, kv_mask = _prompt_pass(inner, mb.prompt_ids, mb.prompt_mask)
    b, T = mb.mask.shape
    group = torch.arange(b, device=last.device) // G  # [b] the prompt of each row
    last = last[group]  # [b, H] predicts token 0
    if T == 1:
        return last[:, None]
    c_ids = mb.input_ids[:, P:]  # [b, T]
    start = mb.prompt_mask.sum(-1)[group]  # [b] true prompt lengths
    layout = pack_completions(c_ids, mb.mask.bool(), group, kv_mask.bool(), start)
    rest = _packed_pass(inner, layout, prompt_kv)  # [n, H]
    out = last.new_zeros(b, T - 1, last.shape[-1]).masked_scatter(layout.keep[..., None], rest)
    return torch.cat([last[:, None], out], 1)  # [b, T, H]


PACKED_ATTENTION = "thinkrl_packed"  # the name of packed attention in transformers' registry


def _packed_pass(inner, layout, prompt_kv: list) -> Tensor:
    """Run the packed tokens of ``layout`` through the decoder, each attending to its group's
    prompt keys/values ``prompt_kv`` (per layer, [g, nkv, P, hd]); returns [n, H]. The layers
    run as they are; only their attention function is swapped, for this call."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, _packed_attention)
    config = inner.config
    eager = device.train_attention(str(layout.ids.device)) == "eager"  # plain matmuls on the CPU
    run = {"layout": layout, "prompt_kv": prompt_kv, "eager": eager, "layers": set()}
    before = config._attn_implementation
    config._attn_implementation = PACKED_ATTENTION
    try:
        out = inner(
            input_ids=layout.ids[None], position_ids=layout.pos[None], use_cache=False, thinkrl_packed=run
        ).last_hidden_state[0]
    finally:
        config._attn_implementation = before
    if len(run["layers"]) != len(prompt_kv):
        raise RuntimeError(
            f"{type(inner).__name__}: {len(run['layers'])} of {len(prompt_kv)} layers ran the packed "
            "attention; this model cannot run packed completions"
        )
    return out


def _packed_attention(module, query, key, value, attention_mask, scaling=None, thinkrl_packed=None, **kwargs):
    """transformers' attention interface for :func:`_packed_pass`: ``query`` [1, nh, n, hd]
    and ``key``/``value`` [1, nkv, n, hd] of the packed tokens, after RoPE; returns the
    attention output [1, n, nh, hd] (and no weights)."""
    if thinkrl_packed is None or kwargs.get("softcap") is not None:
        raise RuntimeError("packed attention runs only inside _packed_pass, without a logit soft-cap")
    pk, pv = thinkrl_packed["prompt_kv"][module.layer_idx]
    thinkrl_packed["layers"].add(module.layer_idx)
    out = thinkrl_packed["layout"].attend(
        query, key, value, pk, pv, scale=scaling, eager=thinkrl_packed["eager"]
    )
    return out.transpose(1, 2), None


def _prompt_pass(inner, ids: Tensor, mask: Tensor) -> tuple[Tensor, list, Tensor]:
    """Run the left-padded prompts ``ids`` [g, P] (real tokens where ``mask``); returns the
    last position's hidden state [g, H], each layer's keys and values [g, nkv, P, hd], and
    the mask [g, P] of the key slots that hold real tokens.

    The prefix that all g prompts share (a chat template's system prompt and few-shot turns)
    runs once, on one row, and its keys/values are expanded to the g rows (gradients flow
    back through the expansion into that one pass); the prompts' own tails then run against
    it, in the layout [prefix | left-padded tails] (hence the returned mask). Exact: the
    same hidden states and gradients as running every prompt in full."""
    from transformers import DynamicCache

    g, P = ids.shape
    real = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    L = shared_prefix_len(real)
    if L == 0:
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [g, P]
        out = inner(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        return out.last_hidden_state[:, -1], [(c.keys, c.values) for c in out.past_key_values.layers], mask
    S = P - L
    dev = ids.device
    pre = inner(
        input_ids=torch.tensor([real[0][:L]], device=dev),
        position_ids=torch.arange(L, device=dev)[None],
        use_cache=True,
    )
    cache = DynamicCache()
    for i, c in enumerate(pre.past_key_values.layers):
        cache.update(c.keys.expand(g, -1, -1, -1), c.values.expand(g, -1, -1, -1), i)  # [g, nkv, L, hd]
    t_ids = torch.tensor(
        [[0] * (S - len(r) + L) + r[L:] for r in real], device=dev
    )  # [g, S] left-padded tails
    t_mask = torch.zeros(g, S, dtype=mask.dtype, device=dev)
    for i, r in enumerate(real):
        t_mask[i, S - len(r) + L :] = 1
    kv_mask = torch.cat([torch.ones(g, L, dtype=mask.dtype, device=dev), t_mask], 1)  # [g, P]
    pos = L + (t_mask.cumsum(-1) - 1).clamp(min=0)  # [g, S]
    out = inner(
        input_ids=t_ids, attention_mask=kv_mask, position_ids=pos, past_key_values=cache, use_cache=True
    )
    return out.last_hidden_state[:, -1], [(c.keys, c.values) for c in out.past_key_values.layers], kv_mask
