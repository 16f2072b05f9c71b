"""thinkrl's own generation engine for Llama-family models on CPU.

Why not ``generate``: on a small model, HF ``generate`` spends most of its time
outside the matmuls (cache objects, logits processors, mask building per step),
and under bf16 autocast it re-casts every weight at every step. This engine:

- keeps a bf16 copy of the weights (fp32 where the CPU lacks bf16), fused per
  layer into one QKV and one gate/up matrix, refreshed from the trained model
  before each rollout;
- prefills each distinct prompt once and repeats its keys/values for its G
  samples;
- writes keys/values into a preallocated cache and attends with
  ``scaled_dot_product_attention`` (grouped-query heads without copying);
- drops finished sequences from the batch as they end;
- samples with temperature / top-k / top-p and returns each sampled token's
  log-prob under the temperature-scaled distribution (what the trainer uses).

Supported: ``llama``, ``mistral`` and ``qwen2`` decoder layouts (RMSNorm, RoPE,
GQA attention, SwiGLU MLP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from thinkrl.rollout import Rollout, SamplingParams

SUPPORTED = ("llama", "mistral", "qwen2")


@dataclass
class _Layer:
    ln_in: Tensor  # [H] fp32
    wqkv: Tensor  # [(nh + 2 nkv) * hd, H]
    bqkv: Tensor | None
    wo: Tensor  # [H, nh * hd]
    ln_post: Tensor  # [H] fp32
    wgu: Tensor  # [2 I, H]
    wd: Tensor  # [H, I]
    packed: dict | None = None  # the same four weights in oneDNN's blocked layout (see _prepack)


PACKED = ("wqkv", "wo", "wgu", "wd")


def _linear(x: Tensor, w: Tensor, packed: Tensor | None, b: Tensor | None = None) -> Tensor:
    """``x @ w.T + b``; through the oneDNN kernel on the prepacked copy of ``w`` when there is one."""
    if packed is None:
        return F.linear(x, w, b)
    return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")


def _search(cdf: Tensor) -> Tensor:
    """Draw one index per row of an (unnormalised) CDF [b, V]; the first index whose CDF
    exceeds u, so entries of probability 0 (a flat CDF step) are never drawn."""
    u = torch.rand(cdf.shape[0], 1) * cdf[:, -1:]  # [b, 1]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)  # [b]


def _unnormalised_probs(shifted: Tensor) -> Tensor:
    """``exp(shifted)`` for logits shifted so their maximum is 0, with every argument below
    -80 raised to -80. The exp kernel is ~40x slower on arguments whose result underflows,
    which a sharp or low-temperature distribution over a large vocabulary has in numbers
    (benchmarks/decode_small_ops.py); a token at -80 has
    probability below 2e-35, so the change to any probability is below 1e-30 relative.
    -inf (banned) entries become e^-80 too: callers zero them where they must be 0."""
    return shifted.clamp(min=-80.0).exp_()


def _rms(x: Tensor, w: Tensor, eps: float) -> Tensor:
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * w


def _effective_weight(module) -> Tensor:
    """The weight [out, in] that ``module`` applies, detached. For a peft LoRA layer that is
    the base weight plus the delta (alpha / r) B A of each active adapter, unless the
    adapters are disabled or already merged into the base weight (which then holds them)."""
    if not hasattr(module, "get_delta_weight"):  # a plain nn.Linear / nn.Embedding
        return module.weight.detach()
    w = module.get_base_layer().weight.detach()
    if module.merged or module.disable_adapters:
        return w
    for name in module.active_adapters:
        if name in module.lora_A or name in getattr(module, "lora_embedding_A", {}):
            w = w + module.get_delta_weight(name).detach()
    return w


class FastEngine:
    def __init__(self, model, tokenizer, *, batch_size: int = 64, bf16: bool = True,
                 stop_strings: tuple[str, ...] = (), prepack: bool = True):
        cfg = model.config
        if cfg.model_type not in SUPPORTED:
            from thinkrl.config import ConfigError

            raise ConfigError(f"rollout.backend=fast supports {', '.join(SUPPORTED)} models, not "
                              f"'{cfg.model_type}'; use rollout.backend=hf")
        self.model, self.tok, self.batch_size = model, tokenizer, batch_size
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        self.nh = cfg.num_attention_heads
        self.nkv = getattr(cfg, "num_key_value_heads", None) or self.nh
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.nh
        self.eps = cfg.rms_norm_eps
        self.stop_strings = tuple(stop_strings)
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = sorted({tokenizer.eos_token_id, *eos} - {None})
        self._rope_inv_freq = self._inv_freq(cfg)
        self._version = None
        # bf16 weights reordered once per sync into oneDNN's blocked layout: at the decode
        # shapes (64 rows x 576 -> 1536, 49152, ...) that runs 1.2-2.6x faster than F.linear,
        # which reorders the weight inside every call (benchmarks/decode_matmul.py).
        self.prepack = prepack and bf16 and torch.backends.mkldnn.is_available() and \
            hasattr(torch.ops.mkldnn, "_linear_pointwise")
        self.head_packed = None

    # -- weights ---------------------------------------------------------------------------

    def _inv_freq(self, cfg) -> Tensor:
        rope = getattr(cfg, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        kind = rope.get("rope_type", "default")
        if kind not in ("default", None):
            from thinkrl.config import ConfigError

            raise ConfigError(f"rollout.backend=fast: RoPE scaling '{kind}' is not implemented; use backend=hf")
        return 1.0 / (theta ** (torch.arange(0, self.hd, 2, dtype=torch.float32) / self.hd))

    def freeze(self) -> FastEngine:
        """Copy the weights once and let go of the model (for a model that never trains, such
        as the KL reference: only the engine's low-precision copy stays in memory)."""
        self.sync()
        self.model = None
        return self

    def sync(self) -> None:
        """Copy the trained model's current weights into the engine's fused low-precision copy.

        A peft (LoRA) model contributes its effective weights W + (alpha / r) B A, so the
        engine samples from the policy being trained, not from its frozen base."""
        m = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        inner = getattr(m, m.base_model_prefix)
        dt = self.dtype
        W = _effective_weight
        with torch.no_grad():
            self.embed = W(inner.embed_tokens).to(dt)  # [V, H]
            self.head = W(m.get_output_embeddings()).to(dt)  # [V, H]
            self.ln_final = inner.norm.weight.detach().float()
            self.layers = []
            for layer in inner.layers:
                at, mlp = layer.self_attn, layer.mlp
                wqkv = torch.cat([W(at.q_proj), W(at.k_proj), W(at.v_proj)]).to(dt)
                b = None
                if at.q_proj.bias is not None:
                    b = torch.cat([at.q_proj.bias, at.k_proj.bias, at.v_proj.bias]).to(dt)
                self.layers.append(_Layer(
                    ln_in=layer.input_layernorm.weight.detach().float(), wqkv=wqkv, bqkv=b,
                    wo=W(at.o_proj).to(dt), ln_post=layer.post_attention_layernorm.weight.detach().float(),
                    wgu=torch.cat([W(mlp.gate_proj), W(mlp.up_proj)]).to(dt), wd=W(mlp.down_proj).to(dt)))
            self._prepack()

    def _prepack(self) -> None:
        """Reorder the bf16 weights for oneDNN (a private torch op: checked against F.linear at
        every sync, and switched off for good with a warning if it is missing or disagrees)."""
        self.head_packed = None
        if not self.prepack:
            return
        try:
            def pack(w: Tensor) -> Tensor:
                return torch.ops.mkldnn._reorder_linear_weight(w, self.batch_size)

            for L in self.layers:
                L.packed = {k: pack(getattr(L, k)) for k in PACKED}
            self.head_packed = pack(self.head)
            L = self.layers[0]
            x = torch.randn(3, L.wqkv.shape[1], generator=torch.Generator().manual_seed(0)).to(self.dtype)
            want, got = F.linear(x, L.wqkv, L.bqkv).float(), _linear(x, L.wqkv, L.packed["wqkv"], L.bqkv).float()
            if not torch.allclose(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item()):
                raise RuntimeError(f"max difference {(got - want).abs().max().item():.3g}")
        except Exception as e:  # noqa: BLE001 (any failure of a private op means: do without it)
            import logging

            logging.getLogger(__name__).warning("oneDNN prepacked linear unavailable (%s); using F.linear", e)
            self.prepack, self.head_packed = False, None
            for L in self.layers:
                L.packed = None

    # -- the forward pass ------------------------------------------------------------------

    def _rope(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        freqs = pos.float()[..., None] * self._rope_inv_freq  # [b, s, hd/2]
        emb = torch.cat([freqs, freqs], -1)  # [b, s, hd]
        return emb.cos()[:, None].to(self.dtype), emb.sin()[:, None].to(self.dtype)  # [b, 1, s, hd]

    @staticmethod
    def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rot * sin

    def _forward(self, ids: Tensor, pos: Tensor, kv: list[tuple[Tensor, Tensor]], start: int,
                 attn_mask: Tensor, all_hidden: bool = False) -> Tensor:
        """Run ``ids`` [b, s] at cache slots start..start+s-1; returns last-position logits [b, V] fp32,
        or with ``all_hidden`` the final-norm hidden states of every position [b, s, H].

        attn_mask: [b, 1, s, start+s] bool, True where a query may attend a key slot.
        """
        b, s = ids.shape
        nh, nkv, hd, dt = self.nh, self.nkv, self.hd, self.dtype
        x = self.embed[ids].float()  # [b, s, H] residual stream kept in fp32
        cos, sin = self._rope(pos)
        end = start + s
        for L, (kc, vc) in zip(self.layers, kv):
            h = _rms(x, L.ln_in, self.eps).to(dt)  # [b, s, H]
            P = L.packed or {}
            qkv = _linear(h, L.wqkv, P.get("wqkv"), L.bqkv)  # [b, s, (nh + 2 nkv) hd]
            q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], -1)
            q = self._rotate(q.view(b, s, nh, hd).transpose(1, 2), cos, sin)  # [b, nh, s, hd]
            k = self._rotate(k.view(b, s, nkv, hd).transpose(1, 2), cos, sin)  # [b, nkv, s, hd]
            kc[:, :, start:end] = k
            vc[:, :, start:end] = v.view(b, s, nkv, hd).transpose(1, 2)
            if s == 1:
                a = self._decode_attention(q, kc, vc, attn_mask)  # [b, nh, 1, hd]
            else:
                a = F.scaled_dot_product_attention(q, kc[:, :, :end], vc[:, :, :end], attn_mask=attn_mask,
                                                   enable_gqa=nkv != nh)  # [b, nh, s, hd]
            x = x + _linear(a.transpose(1, 2).reshape(b, s, nh * hd), L.wo, P.get("wo")).float()
            h = _rms(x, L.ln_post, self.eps).to(dt)
            g, u = _linear(h, L.wgu, P.get("wgu")).chunk(2, -1)  # [b, s, I] each
            x = x + _linear(F.silu(g) * u, L.wd, P.get("wd")).float()
        if all_hidden:
            return _rms(x, self.ln_final, self.eps).to(dt)  # [b, s, H]
        last = _rms(x[:, -1], self.ln_final, self.eps).to(dt)  # [b, H]
        return _linear(last, self.head, self.head_packed).float()  # [b, V]

    def _decode_attention(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        """Attention of one new token per row: q [b, nh, 1, hd] against the whole cache k/v
        [b, nkv, L, hd]; bias [b, 1, 1, L'] (L' <= L) additive (0 or -inf) or bool (True =
        visible), slots past L' are not visible. The nh / nkv query heads that share a key
        head are stacked as rows of one small matmul, so keys are read once per key head.
        (For a single query the fused SDPA kernel spends most of its time on set-up, and a
        matmul on a slice of the cache copies the slice first: reading the whole contiguous
        cache, unwritten slots masked, is ~2x faster.)"""
        b, nh, _, hd = q.shape
        nkv, L = k.shape[1], k.shape[2]
        if bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape).masked_fill_(~bias, float("-inf"))
        if bias.shape[-1] < L:
            bias = F.pad(bias, (0, L - bias.shape[-1]), value=float("-inf"))
        rep = nh // nkv
        # [b, nkv, L, hd] slices of the cache merge (b, nkv) into one batch dim as views, so the
        # two bmm calls read the cache in place (a 4-D matmul on the slice would copy it first).
        k3, v3 = k.reshape(b * nkv, L, hd), v.reshape(b * nkv, L, hd)
        qg = q.reshape(b * nkv, rep, hd)  # query head h uses key head h // rep
        scores = torch.bmm(qg, k3.transpose(1, 2)).view(b, nkv, rep, L).float() * hd ** -0.5 + bias
        probs = torch.softmax(scores, -1).to(v.dtype).view(b * nkv, rep, L)
        return torch.bmm(probs, v3).view(b, nh, 1, hd)  # [b, nh, 1, hd]

    # -- sampling --------------------------------------------------------------------------

    @staticmethod
    def _sample(logits: Tensor, p: SamplingParams, banned: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Next tokens [b] and their log-probs [b] under softmax(logits / temperature).

        ``logits`` [b, V] fp32 is overwritten. ``banned`` token ids get probability 0.
        """
        if banned is not None:
            logits[:, banned] = float("-inf")
        if p.temperature <= 0:
            tok = logits.argmax(-1)
            shifted = logits.sub_(logits.amax(-1, keepdim=True))  # [b, V], 0 at the argmax
            logz = _unnormalised_probs(shifted).sum(-1).log()  # [b]
            return tok, shifted.gather(-1, tok[:, None]).squeeze(-1) - logz
        if p.temperature != 1.0:
            logits.mul_(1.0 / p.temperature)
        top = logits.amax(-1, keepdim=True)  # [b, 1]
        if not p.top_k and p.top_p >= 1.0:
            # Inverse-CDF sampling on unnormalised probabilities: one exp, one cumsum and a
            # binary search per row. (torch.multinomial draws an exponential per vocabulary
            # entry and is ~30x slower on CPU here.) The last CDF entry is the normaliser Z.
            shifted = logits.sub_(top)  # [b, V]
            probs = _unnormalised_probs(shifted)
            if banned is not None:
                probs[:, banned] = 0.0
            cdf = probs.cumsum_(-1)  # [b, V]
            tok = _search(cdf)
            logz = cdf[:, -1].log()  # [b] log-partition of the shifted logits
            return tok, shifted.gather(-1, tok[:, None]).squeeze(-1) - logz
        logp = torch.log_softmax(logits, -1)  # [b, V] the unfiltered distribution's log-probs
        filt = logits
        if p.top_k and p.top_k < logits.shape[-1]:
            kth = torch.topk(filt, p.top_k, -1).values[:, -1:]  # [b, 1]
            filt = filt.masked_fill(filt < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_l, idx = torch.sort(filt, -1, descending=True)
            probs = torch.softmax(sorted_l, -1)
            drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest set reaching top_p
            sorted_l = sorted_l.masked_fill(drop, float("-inf"))
            filt = torch.full_like(filt, float("-inf")).scatter(-1, idx, sorted_l)
        tok = _search(torch.softmax(filt, -1).cumsum_(-1))
        return tok, logp.gather(-1, tok[:, None]).squeeze(-1)

    # -- the public API --------------------------------------------------------------------

    @torch.inference_mode()
    def score(self, mb, temperature: float = 1.0) -> Tensor:
        """Log-probs [b, T] (zero on padding) of a trainer micro-batch's completion tokens
        (:class:`thinkrl.trainer.batch.MicroBatch`) under the engine's current weights, with
        no autograd: each prompt is prefilled once, its keys/values repeated for its G
        completions, and all completion tokens run in one forward pass. What the trainer's
        ``token_logps`` computes, in bf16 with fused weights; used for frozen models
        (the KL reference), whose weights are synced once."""
        from thinkrl.trainer.batch import HeadLogProbs

        P, T = mb.prompt_len, mb.mask.shape[1]
        grouped = mb.prompt_ids is not None and mb.group_size > 1
        G = mb.group_size if grouped else 1
        p_ids = mb.prompt_ids if grouped else mb.input_ids[:, :P]  # [g, P] left-padded
        p_mask = (mb.prompt_mask if grouped else mb.attention_mask[:, :P]).bool()  # [g, P]
        c_ids, c_mask = mb.input_ids[:, P:], mb.mask.bool()  # [b, T] right-padded
        g, b = p_ids.shape[0], c_ids.shape[0]
        valid = torch.zeros(g, P + T, dtype=torch.bool)  # key slots holding real tokens
        valid[:, :P] = p_mask
        pos = (p_mask.long().cumsum(-1) - 1).clamp(min=0)  # [g, P]
        kv = [(torch.zeros(g, self.nkv, P + T, self.hd, dtype=self.dtype),
               torch.zeros(g, self.nkv, P + T, self.hd, dtype=self.dtype)) for _ in self.layers]
        mask = (torch.ones(P, P, dtype=torch.bool).tril()[None] & p_mask[:, None, :])[:, None]  # [g, 1, P, P]
        last = self._forward(p_ids, pos, kv, 0, mask | torch.eye(P, dtype=torch.bool)[None, None])  # [g, V]
        rep = torch.arange(g).repeat_interleave(G)  # [b]
        out = torch.zeros(b, T)
        first = torch.log_softmax(last[rep] / temperature, -1).gather(-1, c_ids[:, :1]).squeeze(-1)  # [b]
        out[:, 0] = first * c_mask[:, 0]
        if T == 1:
            return out
        kv = [(k.repeat_interleave(G, 0), v.repeat_interleave(G, 0)) for k, v in kv]  # plain copies: ~3x faster than k[rep]
        valid = valid[rep]
        valid[:, P:] = c_mask
        # Query i (completion position i, predicting token i+1) sees the prompt and tokens 0..i.
        causal = torch.ones(T - 1, T - 1, dtype=torch.bool).tril()  # [T-1, T-1]
        keys = torch.cat([valid[:, None, :P].expand(b, T - 1, P), causal[None] & c_mask[:, None, : T - 1]], -1)
        start = p_mask.sum(-1)[rep, None]  # [b, 1] true prompt lengths
        h = self._forward(c_ids[:, : T - 1], start + torch.arange(T - 1)[None], kv, P, keys[:, None],
                          all_hidden=True)  # [b, T-1, H]
        keep = c_mask[:, 1:]  # [b, T-1] positions whose next token is real
        lp, _ = HeadLogProbs.apply(h[keep], self.head, c_ids[:, 1:][keep], temperature,
                                   self.dtype == torch.bfloat16, False)  # [n]
        out[:, 1:] = out[:, 1:].masked_scatter(keep, lp)
        return out

    @torch.inference_mode()
    def generate(self, prompts: list[str], n: int, params: SamplingParams) -> Rollout:
        if self.model is not None:  # a frozen engine keeps the weights it copied
            self.sync()
        ids = [self.tok(p, add_special_tokens=False).input_ids for p in prompts]
        per_chunk = max(1, self.batch_size // n)  # prompts per chunk, so a chunk holds ~batch_size rows
        comps: list[list[int]] = []
        logps: list[list[float]] = []
        for s in range(0, len(ids), per_chunk):
            c, lp = self._generate_chunk(ids[s: s + per_chunk], n, params)
            comps += c
            logps += lp
        flat = [x for x in ids for _ in range(n)]
        truncated = [not (c and c[-1] in self.eos_ids) for c in comps]
        texts = self.tok.batch_decode(comps, skip_special_tokens=True)
        return Rollout(prompt_ids=flat, completion_ids=comps, texts=texts, truncated=truncated, logps=logps)

    def _generate_chunk(self, prompts: list[list[int]], n: int, params: SamplingParams):
        P = max(len(p) for p in prompts)
        maxlen = P + params.max_new_tokens
        g = len(prompts)
        pad = self.tok.pad_token_id or 0
        ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])  # [g, P]
        valid = torch.zeros(g, maxlen, dtype=torch.bool)  # key slots holding real tokens
        for i, p in enumerate(prompts):
            valid[i, P - len(p): P] = True
        pos = (valid[:, :P].long().cumsum(-1) - 1).clamp(min=0)  # [g, P]
        kv = [(torch.zeros(g, self.nkv, maxlen, self.hd, dtype=self.dtype),
               torch.zeros(g, self.nkv, maxlen, self.hd, dtype=self.dtype)) for _ in self.layers]
        causal = torch.ones(P, P, dtype=torch.bool).tril()  # [P, P]
        mask = (causal[None] & valid[:, None, :P])[:, None]  # [g, 1, P, P]
        # Fully masked query rows (left padding) would give NaN; let them see themselves.
        mask = mask | torch.eye(P, dtype=torch.bool)[None, None]
        logits = self._forward(ids, pos, kv, 0, mask)  # [g, V]

        # Repeat each prompt's state for its n samples.
        rep = torch.arange(g).repeat_interleave(n)  # [B]
        kv = [(k.repeat_interleave(n, 0), v.repeat_interleave(n, 0)) for k, v in kv]  # plain copies: ~3x faster than k[rep]
        valid, logits = valid[rep], logits[rep]
        next_pos = valid[:, :P].sum(-1)  # [B] position of the first new token
        B = g * n
        out = [[] for _ in range(B)]
        out_lp = [[] for _ in range(B)]
        alive = torch.arange(B)  # which output rows the batch rows are
        fin = torch.zeros(B, dtype=torch.bool)  # finished rows still in the batch
        eos = torch.tensor(self.eos_ids)
        for t in range(params.max_new_tokens):
            tok, lp = self._sample(logits, params, eos if t < params.min_new_tokens else None)  # [b]
            for r, tk, l, f in zip(alive.tolist(), tok.tolist(), lp.tolist(), fin.tolist()):
                if not f:
                    out[r].append(tk)
                    out_lp[r].append(l)
            done = torch.isin(tok, eos)
            if self.stop_strings:
                done |= torch.tensor([self._hit_stop(out[r]) for r in alive.tolist()])
            fin |= done
            if t == params.max_new_tokens - 1 or bool(fin.all()):
                break
            # Drop finished rows once a quarter of the batch has finished: copying the cache
            # costs about as much as a few decode steps, so not after every single finish.
            if int(fin.sum()) >= max(1, fin.numel() // 4):
                keep = (~fin).nonzero().squeeze(-1)
                alive, tok, next_pos, valid, fin = alive[keep], tok[keep], next_pos[keep], valid[keep], fin[keep]
                kv = [(k.index_select(0, keep), v.index_select(0, keep)) for k, v in kv]
            slot = P + t
            valid[:, slot] = True
            step_mask = torch.zeros(valid.shape[0], 1, 1, maxlen).masked_fill_(
                ~valid[:, None, None, :], float("-inf"))  # [b, 1, 1, maxlen] additive; future slots masked
            logits = self._forward(tok[:, None], next_pos[:, None], kv, slot, step_mask)
            next_pos = next_pos + 1
        return out, out_lp

    def _hit_stop(self, toks: list[int]) -> bool:
        tail = self.tok.decode(toks[-16:], skip_special_tokens=True)
        return any(s in tail for s in self.stop_strings)
