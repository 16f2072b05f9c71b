"""thinkrl's own generation engine for Llama- and Qwen-family models on CPU.

Why not ``generate``: on a small model, HF ``generate`` spends most of its time
outside the matmuls (cache objects, logits processors, mask building per step),
and under bf16 autocast it re-casts every weight at every step. This engine:

- keeps a bf16 copy of the weights (fp32 where the CPU lacks native bf16; see
  ``thinkrl/device.py``), fused per layer into one QKV and one gate/up matrix,
  refreshed from the trained model before each rollout, and prepacked for the
  CPU's GEMM library where that runs (oneDNN's blocked layout for bf16, MKL's
  packed sgemm for fp32);
- prefills the prefix that all prompts of a batch share (system prompt, few-shot
  turns: most of a templated prompt) once, then each prompt's own tail once, and
  keeps each prompt's keys/values once for its G samples: at each decode step the
  G samples' queries meet the shared prompt keys in one matmul per group (cascade
  attention), and only the tokens a sample generated live in a per-sample cache;
- runs that decode attention, on bf16 caches, as a small C kernel where one can be
  built and agrees with the torch-ops version (``kernels.py``; the torch ops
  otherwise, and always on fp32 caches, where the torch path is as fast as the
  kernel: benchmarks/decode_attention.py);
- drops finished sequences from the batch as they end;
- samples with temperature / top-k / top-p (the full-vocabulary case in one exp2
  pass and a two-level inverse-CDF search) and returns each sampled token's
  log-prob under the temperature-scaled distribution (what the trainer uses).

Supported: ``llama``, ``mistral``, ``qwen2`` and ``qwen3`` decoder layouts (RMSNorm,
RoPE, GQA attention, SwiGLU MLP; Qwen2's biases on the query/key/value projections; Qwen3's
RMSNorm of every query and key head before RoPE). :func:`unsupported` says why a model falls
outside that (another layout, RoPE scaling, a sliding window, ...); ``build_engine`` then uses
the ``hf`` engine instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from thinkrl import device
from thinkrl.device import is_cuda
from thinkrl.perf import tune_allocator
from thinkrl.rollout.base import ENGINES, Engine, Rollout, SamplingParams, hits_stop, shared_prefix_len
from thinkrl.rollout.hf import HFEngine
from thinkrl.rollout.kernels import decode_attention, decode_attention_kernel
from thinkrl.rollout.packed import Packed, pack_completions
from thinkrl.rollout.thinking import BudgetTracker, budget_tracker, forced_logps

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def unsupported(config) -> str | None:
    """Why this engine cannot reproduce the model of ``config`` exactly, or None if it can.

    The engine computes one decoder layout: pre-norm RMSNorm, rotary embeddings without
    scaling, full causal attention with grouped key/value heads, a SiLU-gated MLP; biases only
    on the query/key/value projections (Qwen2), and optionally an RMSNorm per query and key
    head (Qwen3). Anything else would silently change the model's distribution, so it is
    reported here instead of approximated."""
    kind = config.model_type
    if kind not in SUPPORTED:
        return f"model type '{kind}' (supported: {', '.join(SUPPORTED)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation '{config.hidden_act}' (supported: silu)"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") not in ("default", None):
        return f"RoPE scaling '{rope['rope_type']}'"
    if rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) != 1.0:
        return "partial rotary embeddings"
    if getattr(config, "attention_bias", False) and kind != "qwen2":
        return "a bias on the attention output projection"  # attention_bias biases o_proj too
    if getattr(config, "mlp_bias", False):
        return "biases in the MLP"
    window = sliding_window(config)
    if window:
        return f"sliding-window attention ({window} tokens)"
    return None


def sliding_window(config) -> int | None:
    """The attention window of ``config`` where one can cut attention short, else None.

    Qwen2/3 name a window per layer (``layer_types``; off unless ``use_sliding_window``);
    Mistral applies ``sliding_window`` to every layer, which changes nothing for sequences no
    longer than it, so a window as long as ``max_position_embeddings`` does not count."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in types):
        return window or -1
    if config.model_type == "mistral" and window and window < getattr(config, "max_position_embeddings", 0):
        return window
    return None


@dataclass
class _Layer:
    ln_in: Tensor  # [H] fp32
    wqkv: Tensor  # [(nh + 2 nkv) * hd, H]
    bqkv: Tensor | None
    wo: Tensor  # [H, nh * hd]
    ln_post: Tensor  # [H] fp32
    wgu: Tensor  # [2 I, H]
    wd: Tensor  # [H, I]
    qk_norm: Tensor | None = (
        None  # [nh + nkv, hd] fp32: Qwen3's q_norm weight per query head, then k_norm per key head
    )
    packed: dict | None = None  # the same four weights prepacked for the GEMM library (see _prepack)


PACKED = ("wqkv", "wo", "wgu", "wd")


@dataclass
class _DecodeState:
    """What the decode steps of one chunk (``groups`` prompts x ``n`` samples) share.

    caches: per layer [prompt keys [nkv, g, hd, P], prompt values [nkv, g, P, hd], generated keys
    [nkv, b, hd, T], generated values [nkv, b, T, hd]] (keys transposed, so that a score matmul
    reads them in place); the prompt caches are stored once per group, the generated ones per
    batch row. pstart [g]: the first real slot of each prompt (before it, left padding);
    bias [1, b, 1, P + T]: the same mask for the torch path, 0 or -inf (None with the kernel). alive [b]: which of the
    chunk's rows the batch rows are (rows that finished are dropped); group [b]: their prompts.
    t: the generated-cache slot the current token goes to. q_buf / p_buf: the torch path's
    prompt-part inputs for all rows, used once some rows were dropped. kernel: the C
    decode-attention function, or None for the torch path."""

    groups: int
    n: int
    rep: int  # query heads per key head
    caches: list[list[Tensor]]
    pstart: Tensor
    alive: Tensor
    group: Tensor
    bias: Tensor | None = None
    kernel: object = None
    t: int = 0
    q_buf: Tensor | None = None
    p_buf: Tensor | None = None

    def drop(self, keep: Tensor) -> None:
        """Keep only the batch rows ``keep`` (indices into the current batch)."""
        self.alive, self.group = self.alive[keep], self.group[keep]
        if self.bias is not None:
            self.bias = self.bias.index_select(1, keep)
        for c in self.caches:
            c[2], c[3] = c[2].index_select(1, keep), c[3].index_select(1, keep)
        if self.q_buf is None and self.kernel is None:  # zeros: rows no longer alive must hold finite values
            nkv, _, hd, P = self.caches[0][0].shape
            rows, dt = self.groups * self.n, self.caches[0][0].dtype
            self.q_buf = torch.zeros(nkv, rows, self.rep, hd, dtype=dt)
            self.p_buf = torch.zeros(nkv, rows, self.rep, P, dtype=dt)


LOG2E, LN2 = 1.4426950408889634, 0.6931471805599453
EXP2_FLOOR = -115.0  # 2^-115 ~ 2e-35 (e^-80); arguments whose result underflows slow the exp kernels down


def _unnormalised_probs(logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """For logits [b, V] fp32 (overwritten): ``z = (logits - max) / temperature`` in base-2 units
    (returned, in the same storage) and the unnormalised probabilities ``2^z`` [b, V] (a new tensor).

    Base 2 because ``exp2`` is faster than ``exp`` on CPU (benchmarks/decode_small_ops.py;
    docs/speed.md). Arguments below -115 are raised to -115 first: exp kernels are much
    slower on arguments whose result underflows (same benchmark), which a sharp or low-temperature distribution over a large vocabulary has
    in numbers; a token there has probability below 2e-35, so no probability moves by more
    than 1e-30 relative. -inf (banned) entries become 2^-115 too: callers zero them where
    they must be 0."""
    z = logits.sub_(logits.amax(-1, keepdim=True)).mul_(LOG2E / temperature)
    return z, z.clamp(min=EXP2_FLOOR).exp2_()


def _draw(probs: Tensor, block: int = 256) -> tuple[Tensor, Tensor]:
    """Draw one index per row of unnormalised probabilities [b, V] (inverse-CDF sampling) and
    return it with the row's normaliser Z [b]. Two levels, so no full-vocabulary cumulative
    sum (a serial scan, ~20x slower than block sums here; benchmarks/decode_small_ops.py):
    sums of blocks of ``block`` entries, a search among the blocks, then a search inside the
    chosen block. An entry of probability 0 is never drawn: the search takes the first index
    whose CDF exceeds u."""
    b, V = probs.shape
    nb = -(-V // block)
    if nb * block != V:
        probs = F.pad(probs, (0, nb * block - V))
    blocks = probs.view(b, nb, block)
    sums = blocks.sum(-1).double()  # [b, nb]; summed in fp32: sum(dtype=float64) is far slower here
    cdf = sums.cumsum(-1)  # [b, nb]
    z = cdf[:, -1:]  # [b, 1]
    u = (torch.rand(b, 1, dtype=torch.float64) * z).clamp(max=z * (1 - 1e-12))
    j = torch.searchsorted(cdf, u, right=True).clamp(max=nb - 1)  # [b, 1] the block
    inner = blocks[torch.arange(b), j.squeeze(-1)].double().cumsum(-1)  # [b, block]
    rest = (u - (cdf.gather(-1, j) - sums.gather(-1, j))).clamp(min=0)  # [b, 1] u's place inside the block
    rest = torch.minimum(rest, inner[:, -1:] * (1 - 1e-12))  # rounding must not push u past the block
    k = torch.searchsorted(inner, rest, right=True).clamp(max=block - 1)  # [b, 1]
    return (j * block + k).squeeze(-1), z.squeeze(-1)


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


def _cascade_attention(q: Tensor, k: Tensor, v: Tensor, cache: list[Tensor], st: _DecodeState) -> Tensor:
    """Attention of one new token per row, q [b, nh, hd] (already scaled), k and v [b, nkv, hd],
    over the row's prompt and the tokens it generated so far; returns [b, nh * hd].

    The G samples of a prompt share its keys and values, so the prompt part runs once per
    group: the queries of the group's rows (and of the query heads sharing a key head) are
    the rows of one matmul against the group's prompt keys, read once instead of G times.
    The generated part is per row. Both parts' scores go into one softmax. Layouts are
    key-head major ([nkv, rows, ...]) so that the two parts line up without copies."""
    kp, vp, kg, vg = cache  # layouts: see _DecodeState
    b, nh, hd = q.shape
    nkv, rep, g, n, t = kp.shape[0], st.rep, st.groups, st.n, st.t
    B, Pl = g * n, kp.shape[3]
    kg[:, :, :, t] = k.transpose(0, 1)
    vg[:, :, t] = v.transpose(0, 1)
    qa = q.reshape(b, nkv, rep, hd).transpose(0, 1).contiguous()  # [nkv, b, rep, hd]
    full = b == B
    if full:
        qp = qa
    else:  # rows were dropped: the prompt part runs on a buffer of all G rows per group
        qp = st.q_buf
        qp.index_copy_(1, st.alive, qa)
    sp = torch.bmm(qp.view(nkv * g, n * rep, hd), kp.view(nkv * g, hd, Pl)).view(nkv, B, rep, Pl)
    if not full:
        sp = sp.index_select(1, st.alive)
    sg = torch.bmm(qa.view(nkv * b, rep, hd), kg.view(nkv * b, hd, -1)[:, :, : t + 1]).view(
        nkv, b, rep, t + 1
    )
    probs = torch.softmax(torch.add(torch.cat([sp, sg], -1), st.bias[:, :, :, : Pl + t + 1]), -1).to(q.dtype)
    pp, pg = probs[..., :Pl], probs[..., Pl:]  # [nkv, b, rep, P], [nkv, b, rep, t + 1]
    if not full:
        pp = st.p_buf.index_copy_(1, st.alive, pp)
    op = torch.bmm(pp.reshape(nkv * g, n * rep, Pl), vp.view(nkv * g, Pl, hd)).view(nkv, B, rep, hd)
    if not full:
        op = op.index_select(1, st.alive)
    og = torch.bmm(pg.reshape(nkv * b, rep, t + 1), vg.view(nkv * b, -1, hd)[:, : t + 1]).view(
        nkv, b, rep, hd
    )
    return op.add_(og).transpose(0, 1).reshape(b, nh * hd)


_CHECKED: dict = {}  # (-march target, dtype) -> the checked kernel or None
KERNEL_TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-5}  # bf16 outputs carry 8 bits of mantissa


def checked_kernel(dtype: torch.dtype = torch.bfloat16):
    """The C decode-attention kernel for ``dtype`` caches, once it has computed what
    :func:`_cascade_attention` computes on a small random problem (ragged prompts, 3 query
    heads per key head, a partly filled generated cache); None, with a warning, if it cannot
    be built or disagrees. Checked once per process, build target and dtype."""
    from thinkrl.rollout.kernels import _march

    key = (_march(), dtype)
    if key not in _CHECKED:
        fn, _CHECKED[key] = decode_attention_kernel(), None
        if fn is not None:
            err = _kernel_error(fn, dtype)
            if err <= KERNEL_TOL[dtype]:
                _CHECKED[key] = fn
            else:
                import logging

                logging.getLogger(__name__).warning(
                    "C decode-attention kernel disagrees with the torch path (max error %.3g); using torch ops",
                    err,
                )
    return _CHECKED[key]


def _kernel_error(fn, dtype: torch.dtype = torch.bfloat16) -> float:
    """Max |kernel - torch path| over one decode step of a small problem (``dtype`` caches)."""
    gen = torch.Generator().manual_seed(0)
    g, n, nkv, rep, hd, P, T, t = 2, 2, 2, 3, 16, 5, 4, 2
    b, nh = g * n, nkv * rep

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    pstart = torch.tensor([0, 2])  # the second prompt is left-padded by 2
    caches = [r(nkv, g, hd, P), r(nkv, g, P, hd), r(nkv, b, hd, T), r(nkv, b, T, hd)]
    q, k, v = r(b, nh, hd) * hd**-0.5, r(b, nkv, hd), r(b, nkv, hd)
    group = torch.arange(g).repeat_interleave(n)
    bias = torch.zeros(1, b, 1, P + T)
    bias[:, :, :, :P].masked_fill_(
        (torch.arange(P)[None] < pstart[group][:, None])[None, :, None], float("-inf")
    )
    st = _DecodeState(
        groups=g,
        n=n,
        rep=rep,
        caches=[[c.clone() for c in caches]],
        pstart=pstart,
        alive=torch.arange(b),
        group=group,
        bias=bias,
        t=t,
    )
    want = _cascade_attention(q, k, v, st.caches[0], st).float()
    c = [x.clone() for x in caches]
    got = decode_attention(
        fn,
        q.reshape(b, nh * hd),
        k.reshape(b, nkv * hd),
        v.reshape(b, nkv * hd),
        *c,
        group,
        pstart,
        t,
        torch.empty(b, nh * hd, dtype=dtype),
    ).float()
    return float((got - want).abs().max())


@ENGINES.register("fast")
class FastEngine(Engine):
    def __init__(
        self,
        model,
        tokenizer,
        *,
        batch_size: int = 64,
        bf16: bool = True,
        stop_strings: tuple[str, ...] = (),
        prepack: bool | None = None,
        kernel: bool | None = None,
    ):
        """``prepack`` and ``kernel``: None follows the device plan (``thinkrl/device.py``);
        False turns the fast path off; True asks for it where the plan says it runs.
        ``stop_strings`` apply to every call, on top of ``SamplingParams.stop``. The weights
        are copied here and then at each :meth:`sync_weights`."""
        cfg = model.config
        why = unsupported(cfg)
        if why is not None:
            from thinkrl.config import ConfigError

            raise ConfigError(f"rollout.backend=fast cannot run this model: {why}; use rollout.backend=hf")
        self.model, self.tok, self.batch_size = model, tokenizer, batch_size
        tune_allocator()  # each decode step allocates and frees MB-sized logits: reuse, no page faults
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
        self._closing: dict | None = None  # the thinking phrases' token ids, tokenized once
        self.packer = device.packer(self.dtype, batch_size, prepack)
        self.head_packed = None
        # decode attention in C (head dims of 16k) where it builds and agrees with the torch path
        use = device.plan().kernel if kernel is None else kernel and device.plan().kernel
        self.kernel = checked_kernel(self.dtype) if use and self.hd % 16 == 0 else None
        self.sync()

    @classmethod
    def build(cls, model, tokenizer, *, batch_size: int, bf16: bool, device: str = "cpu") -> Engine:
        """The fast engine where it runs (the CPU, the layouts :func:`unsupported` accepts);
        elsewhere the hf engine, with one log line saying why. On CUDA the hf engine covers
        rollouts: this engine's gains are CPU ones (prepacked GEMMs, the C kernel, fewer
        small-op dispatches), see docs/devices.md."""
        why = "it runs on the CPU only" if is_cuda(device) else unsupported(model.config)
        if why is None:
            return cls(model, tokenizer, batch_size=batch_size, bf16=bf16)
        import logging

        logging.getLogger(__name__).warning(
            "rollout.backend=fast cannot run this model (%s); using the hf backend", why
        )
        return HFEngine.build(model, tokenizer, batch_size=batch_size, bf16=bf16, device=device)

    @classmethod
    def frozen_scorer(cls, model, tokenizer, *, bf16: bool, device: str = "cpu") -> Engine | None:
        if is_cuda(device) or unsupported(model.config) is not None:
            return None
        return cls(model, tokenizer, bf16=bf16).freeze()

    def describe(self) -> str:
        return (
            f"fast, {'bf16' if self.dtype == torch.bfloat16 else 'fp32'} weights"
            + (f" prepacked ({self.packer.name})" if self.prepack else "")
            + f", decode attention in {'C' if self.kernel is not None else 'torch ops'}"
        )

    def sync_weights(self, model) -> None:
        """Copy ``model``'s current weights in (after an optimizer step). Until then the engine
        samples from its last copy, except that fp32 weights it does not fuse or pack (the
        output projections, embeddings, norms) are the model's own tensors, not copies: so an
        in-place change to the model must be followed by a sync before the next generate."""
        self.model = model
        self.sync()

    # -- weights ---------------------------------------------------------------------------

    def _inv_freq(self, cfg) -> Tensor:
        rope = getattr(cfg, "rope_parameters", None) or {}
        theta = rope.get(
            "rope_theta", getattr(cfg, "rope_theta", 10000.0)
        )  # scaling was refused by unsupported()
        return 1.0 / (theta ** (torch.arange(0, self.hd, 2, dtype=torch.float32) / self.hd))

    def freeze(self) -> FastEngine:
        """Let go of the model, keeping the weights copied at construction (for a model that
        never trains, such as the KL reference: only the engine's low-precision copy stays in
        memory)."""
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
                self.layers.append(
                    _Layer(
                        ln_in=layer.input_layernorm.weight.detach().float(),
                        wqkv=wqkv,
                        bqkv=b,
                        wo=W(at.o_proj).to(dt),
                        ln_post=layer.post_attention_layernorm.weight.detach().float(),
                        wgu=torch.cat([W(mlp.gate_proj), W(mlp.up_proj)]).to(dt),
                        wd=W(mlp.down_proj).to(dt),
                        qk_norm=self._qk_norm(at),
                    )
                )
            self._prepack()

    def _qk_norm(self, attn) -> Tensor | None:
        """Qwen3's per-head norms as one weight [nh + nkv, hd] fp32, laid out like the fused
        query+key heads of a decode step, so one RMSNorm covers both; None without them."""
        if not hasattr(attn, "q_norm"):
            return None
        q, k = attn.q_norm.weight.detach().float(), attn.k_norm.weight.detach().float()  # [hd] each
        return torch.cat([q.expand(self.nh, self.hd), k.expand(self.nkv, self.hd)])

    @property
    def prepack(self) -> bool:
        return self.packer is not None

    def _prepack(self) -> None:
        """Pack the weights for the GEMM library (private torch ops: checked against F.linear
        at every sync, and switched off for good with a warning if they fail or disagree)."""
        self.head_packed = None
        if self.packer is None:
            return
        try:
            pack = self.packer.pack
            for L in self.layers:
                L.packed = {k: pack(getattr(L, k)) for k in PACKED}
            self.head_packed = pack(self.head)
            L = self.layers[0]
            x = torch.randn(3, L.wqkv.shape[1], generator=torch.Generator().manual_seed(0)).to(self.dtype)
            want, got = (
                F.linear(x, L.wqkv, L.bqkv).float(),
                self._linear(x, L.wqkv, L.packed["wqkv"], L.bqkv).float(),
            )
            if not device.agrees(got, want, 1e-2):
                raise RuntimeError(f"max difference {(got - want).abs().max().item():.3g}")
        except Exception as e:  # noqa: BLE001 (any failure of a private op means: do without it)
            import logging

            logging.getLogger(__name__).warning(
                "%s prepacked linear unavailable (%s); using F.linear", self.packer.name, e
            )
            self.packer, self.head_packed = None, None
            for L in self.layers:
                L.packed = None

    def _linear(self, x: Tensor, w: Tensor, packed: Tensor | None, b: Tensor | None = None) -> Tensor:
        """``x @ w.T + b``; from the prepacked copy of ``w`` when there is one."""
        if packed is None:
            return F.linear(x, w, b)
        return self.packer.linear(x, w, packed, b)

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

    def _forward(
        self,
        ids: Tensor,
        pos: Tensor,
        kv: list[tuple[Tensor, Tensor]],
        start: int,
        attn_mask: Tensor | None,
        all_hidden: bool = False,
        packed: Packed | None = None,
    ) -> Tensor:
        """Run ``ids`` [b, s] at cache slots start..start+s-1; returns last-position logits [b, V] fp32,
        or with ``all_hidden`` the final-norm hidden states of every position [b, s, H].

        attn_mask: [b, 1, s, start+s] bool, True where a query may attend a key slot.
        ``packed``: ``ids`` [1, n] are packed completions (thinkrl/rollout/packed.py) and ``kv``
        their groups' prompt keys/values, [g, nkv, P, hd] per layer, which stay as they are;
        ``start`` and ``attn_mask`` are unused.
        """
        b, s = ids.shape
        nh, nkv, hd, dt = self.nh, self.nkv, self.hd, self.dtype
        x = self.embed[ids].float()  # [b, s, H] residual stream kept in fp32
        cos, sin = self._rope(pos)
        end = start + s
        for L, (kc, vc) in zip(self.layers, kv):
            h = _rms(x, L.ln_in, self.eps).to(dt)  # [b, s, H]
            P = L.packed or {}
            qkv = self._linear(h, L.wqkv, P.get("wqkv"), L.bqkv)  # [b, s, (nh + 2 nkv) hd]
            q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], -1)
            q, k = q.view(b, s, nh, hd), k.view(b, s, nkv, hd)
            if L.qk_norm is not None:  # Qwen3: RMSNorm over each head's hd dims, before RoPE
                q, k = _rms(q, L.qk_norm[:nh], self.eps).to(dt), _rms(k, L.qk_norm[nh:], self.eps).to(dt)
            q = self._rotate(q.transpose(1, 2), cos, sin)  # [b, nh, s, hd]
            k = self._rotate(k.transpose(1, 2), cos, sin)  # [b, nkv, s, hd]
            v = v.view(b, s, nkv, hd).transpose(1, 2)
            if packed is not None:
                a = packed.attend(q, k, v, kc, vc, eager=False)  # [1, nh, n, hd]
            else:
                kc[:, :, start:end], vc[:, :, start:end] = k, v
                a = F.scaled_dot_product_attention(
                    q, kc[:, :, :end], vc[:, :, :end], attn_mask=attn_mask, enable_gqa=nkv != nh
                )  # [b, nh, s, hd]
            x = x + self._linear(a.transpose(1, 2).reshape(b, s, nh * hd), L.wo, P.get("wo")).float()
            h = _rms(x, L.ln_post, self.eps).to(dt)
            g, u = self._linear(h, L.wgu, P.get("wgu")).chunk(2, -1)  # [b, s, I] each
            x = x + self._linear(F.silu(g) * u, L.wd, P.get("wd")).float()
        if all_hidden:
            return _rms(x, self.ln_final, self.eps).to(dt)  # [b, s, H]
        last = _rms(x[:, -1], self.ln_final, self.eps).to(dt)  # [b, H]
        return self._linear(last, self.head, self.head_packed).float()  # [b, V]

    def _step_rope(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """cos and signed sin [b, nh + nkv, hd] for one new token per row at positions ``pos`` [b],
        in the layout of the fused query+key heads; the query heads' pair carries the attention
        scale 1/sqrt(hd), so scores need no separate multiply. With ``rot = x.roll(hd/2)``
        (the halves swapped), ``x * cos + rot * sin`` is RoPE's ``x cos + rotate_half(x) sin``."""
        freqs = pos.float()[:, None] * self._rope_inv_freq  # [b, hd/2]
        cos, sin = freqs.cos().repeat(1, 2), freqs.sin()
        sin = torch.cat([-sin, sin], -1)  # [b, hd]
        scale = self.hd**-0.5
        heads = torch.cat([torch.full((self.nh, 1), scale), torch.ones(self.nkv, 1)])  # [nh + nkv, 1]
        return (cos[:, None] * heads).to(self.dtype), (sin[:, None] * heads).to(self.dtype)

    def _decode_step(self, tok: Tensor, pos: Tensor, st: _DecodeState) -> Tensor:
        """One new token per batch row: ``tok`` [b] at positions ``pos`` [b], written to the
        generated-cache slot ``st.t``; returns next-token logits [b, V] fp32."""
        b, H = tok.shape[0], self.embed.shape[1]
        nh, nkv, hd, dt = self.nh, self.nkv, self.hd, self.dtype
        cos, sin = self._step_rope(pos)
        x = self.embed[tok].float()  # [b, H] residual stream in fp32
        for L, cache in zip(self.layers, st.caches):
            P = L.packed or {}
            h = F.rms_norm(x, (H,), L.ln_in, self.eps).to(dt)
            qkv = self._linear(h, L.wqkv, P.get("wqkv"), L.bqkv)  # [b, (nh + 2 nkv) hd]
            qk = qkv[:, : (nh + nkv) * hd].view(b, nh + nkv, hd)
            if L.qk_norm is not None:  # Qwen3: every query and key head RMS-normed before RoPE
                qk = _rms(qk, L.qk_norm, self.eps).to(dt)
            qk = torch.addcmul(qk * cos, qk.roll(hd // 2, -1), sin)  # RoPE on query and key heads at once
            if st.kernel is not None:
                flat = qk.view(b, (nh + nkv) * hd)
                a = decode_attention(
                    st.kernel,
                    flat[:, : nh * hd],
                    flat[:, nh * hd :],
                    qkv[:, (nh + nkv) * hd :],
                    *cache,
                    st.group,
                    st.pstart,
                    st.t,
                    torch.empty(b, nh * hd, dtype=dt),
                )
            else:
                a = _cascade_attention(
                    qk[:, :nh], qk[:, nh:], qkv[:, (nh + nkv) * hd :].view(b, nkv, hd), cache, st
                )
            x.add_(self._linear(a, L.wo, P.get("wo")))
            h = F.rms_norm(x, (H,), L.ln_post, self.eps).to(dt)
            gate, up = self._linear(h, L.wgu, P.get("wgu")).chunk(2, -1)  # [b, I] each
            x.add_(self._linear(F.silu(gate).mul_(up), L.wd, P.get("wd")))
        h = F.rms_norm(x, (H,), self.ln_final, self.eps).to(dt)
        return self._linear(h, self.head, self.head_packed).float()  # [b, V]

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
            _, probs = _unnormalised_probs(logits, 1.0)  # z = 0 at the argmax, so log p = -log Z
            if banned is not None:
                probs[:, banned] = 0.0
            return tok, -probs.sum(-1).double().log().float()  # fp32 sum: see _draw
        if not p.top_k and p.top_p >= 1.0:
            # Inverse-CDF sampling on unnormalised probabilities: one exp and block sums per
            # row. (torch.multinomial draws an exponential per vocabulary entry and is ~30x
            # slower on CPU here.)
            z, probs = _unnormalised_probs(logits, p.temperature)
            if banned is not None:
                probs[:, banned] = 0.0
            tok, total = _draw(probs)
            return tok, (z.gather(-1, tok[:, None]).squeeze(-1).double() * LN2 - total.log()).float()
        if p.temperature != 1.0:
            logits.mul_(1.0 / p.temperature)
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
        tok, _ = _draw(torch.softmax(filt, -1))
        return tok, logp.gather(-1, tok[:, None]).squeeze(-1)

    # -- the public API --------------------------------------------------------------------

    @torch.inference_mode()
    def score(self, mb, temperature: float = 1.0) -> Tensor:
        """Log-probs [b, T] (zero on padding) of a trainer micro-batch's completion tokens
        (:class:`thinkrl.trainer.batch.MicroBatch`) under the engine's current weights, with
        no autograd: each prompt is prefilled once, and all completion tokens then run in one
        packed pass, with no padding (thinkrl/rollout/packed.py), against their prompt's
        keys/values. What the trainer's ``token_logps`` computes, in the engine's dtype with
        fused weights; used for frozen models (the KL reference), whose weights are synced once."""
        P, T = mb.prompt_len, mb.mask.shape[1]
        grouped = mb.prompt_ids is not None and mb.group_size > 1
        G = mb.group_size if grouped else 1
        p_ids = mb.prompt_ids if grouped else mb.input_ids[:, :P]  # [g, P] left-padded
        p_mask = (mb.prompt_mask if grouped else mb.attention_mask[:, :P]).bool()  # [g, P]
        c_ids, c_mask = mb.input_ids[:, P:], mb.mask.bool()  # [b, T] right-padded
        g, b = p_ids.shape[0], c_ids.shape[0]
        last, kv, valid = self._prefill([row[m].tolist() for row, m in zip(p_ids, p_mask)])  # [g, V]
        rep = torch.arange(g).repeat_interleave(G)  # [b] the prompt of each row
        out = torch.zeros(b, T)
        first = torch.log_softmax(last[rep] / temperature, -1).gather(-1, c_ids[:, :1]).squeeze(-1)  # [b]
        out[:, 0] = first * c_mask[:, 0]
        if T == 1:
            return out
        layout = pack_completions(c_ids, c_mask, rep, valid, valid.sum(-1)[rep])
        h = self._forward(layout.ids[None], layout.pos[None], kv, 0, None, all_hidden=True, packed=layout)
        lp = self._head_logps(h[0], c_ids[:, 1:][layout.keep], temperature)  # [n]
        out[:, 1:] = out[:, 1:].masked_scatter(layout.keep, lp)
        return out

    HEAD_CHUNK = 128  # positions per LM-head matmul in score: [128, V] fp32 logits at a time

    def _head_logps(self, h: Tensor, targets: Tensor, temperature: float) -> Tensor:
        """log softmax(h W^T / temperature)[target] [n] for final hidden states h [n, H]
        (what the trainer's HeadLogProbs computes forward, in the engine's dtype)."""
        out = torch.empty(h.shape[0])
        for s in range(0, h.shape[0], self.HEAD_CHUNK):
            z = torch.matmul(h[s : s + self.HEAD_CHUNK], self.head.t()).float()  # [c, V]
            if temperature != 1.0:
                z.div_(temperature)
            out[s : s + self.HEAD_CHUNK] = z.gather(-1, targets[s : s + self.HEAD_CHUNK, None]).squeeze(
                -1
            ) - torch.logsumexp(z, -1)
        return out

    @torch.inference_mode()
    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams) -> Rollout:
        with device.seeded(params.seed):
            return self._generate(prompt_ids, n, params)

    def _generate(self, ids: list[list[int]], n: int, params: SamplingParams) -> Rollout:
        ids = [list(p) for p in ids]
        prompts = self.tok.batch_decode(ids) if params.shapes_thinking else [""] * len(ids)
        ends = sorted(set(self.eos_ids) | set(params.stop_ids))
        stops = self.stop_strings + params.stop_strings
        per_chunk = max(1, self.batch_size // n)  # prompts per chunk, so a chunk holds ~batch_size rows
        comps: list[list[int]] = []
        logps: list[list[float]] = []
        forced: list[list[bool]] = []
        for s in range(0, len(ids), per_chunk):
            budget = self._budget([p for p in prompts[s : s + per_chunk] for _ in range(n)], params)
            c, lp = self._generate_chunk(ids[s : s + per_chunk], n, params, budget, ends, stops)
            comps += c
            logps += lp
            forced += budget.forced if budget is not None else []
        flat = [x for x in ids for _ in range(n)]
        truncated = [not (c and (c[-1] in ends or hits_stop(self.tok, c, stops))) for c in comps]
        texts = self.tok.batch_decode(comps, skip_special_tokens=True)
        return Rollout(
            prompt_ids=flat,
            completion_ids=comps,
            texts=texts,
            truncated=truncated,
            logps=logps,
            forced=forced if params.shapes_thinking else None,
        )

    def _budget(self, prompts: list[str], params: SamplingParams) -> BudgetTracker | None:
        """The bookkeeping of ``params.thinking_budget`` and ``min_thinking`` for a chunk's
        rows, or None without either."""
        if not params.shapes_thinking:
            return None
        tracker, self._closing = budget_tracker(self.tok, params, prompts, self._closing)
        return tracker

    def _prefill(self, prompts: list[list[int]], extra: int = 0):
        """Run the prompts; returns the last positions' logits [g, V] fp32, per-layer key/value
        caches [g, nkv, P + extra, hd] in the left-padded layout (prompt i in slots
        P - len_i .. P - 1, then ``extra`` empty slots), and the mask of real prompt slots [g, P].

        The longest prefix that all the prompts share runs once (a chat template's system
        prompt and few-shot turns are most of each prompt: 120 of the default recipe's 137
        tokens), then every prompt's own tail runs against it. The tails run in the layout
        [prefix | left-padded tails]; their keys already carry their positions (RoPE), so the
        slots are then permuted into the left-padded layout the decode steps read. Exact: the
        same keys, values and logits as running every prompt in full."""
        g, P = len(prompts), max(len(p) for p in prompts)
        nkv, hd, dt = self.nkv, self.hd, self.dtype
        L = shared_prefix_len(prompts)
        S = P - L  # the tails, left-padded to S
        pad = self.tok.pad_token_id or 0
        kv = [
            (torch.zeros(g, nkv, P + extra, hd, dtype=dt), torch.zeros(g, nkv, P + extra, hd, dtype=dt))
            for _ in self.layers
        ]
        if L:
            shared = [
                (torch.zeros(1, nkv, L, hd, dtype=dt), torch.zeros(1, nkv, L, hd, dtype=dt))
                for _ in self.layers
            ]
            causal = torch.ones(L, L, dtype=torch.bool).tril()[None, None]  # [1, 1, L, L]
            self._forward(torch.tensor([prompts[0][:L]]), torch.arange(L)[None], shared, 0, causal)
            for (k, v), (k1, v1) in zip(kv, shared):
                k[:, :, :L], v[:, :, :L] = k1, v1  # broadcast to the g rows
        ids = torch.tensor([[pad] * (S - len(p) + L) + p[L:] for p in prompts])  # [g, S]
        valid = torch.zeros(g, L + S, dtype=torch.bool)  # [g, P] real slots of the [prefix | tails] layout
        valid[:, :L] = True
        for i, p in enumerate(prompts):
            valid[i, P - len(p) + L :] = True
        pos = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, L:]  # [g, S]
        # tail query j (slot L + j) sees real slots up to its own; padding queries see themselves (no NaN)
        mask = torch.ones(S, P, dtype=torch.bool).tril(L)[None] & valid[:, None, :]  # [g, S, P]
        mask[:, torch.arange(S), L + torch.arange(S)] = True
        logits = self._forward(ids, pos, kv, L, mask[:, None])  # [g, V]
        if L:  # [prefix | pads_i | tail_i] -> [pads_i | prefix | tail_i]
            order = torch.empty(g, P, dtype=torch.long)
            for i, p in enumerate(prompts):
                q = P - len(p)  # padding slots of row i
                order[i] = torch.cat([torch.arange(L, L + q), torch.arange(L), torch.arange(L + q, P)])
            idx = order[:, None, :, None].expand(g, nkv, P, hd)
            for j, (k, v) in enumerate(kv):
                kv[j] = (
                    torch.cat([k[:, :, :P].gather(2, idx), k[:, :, P:]], 2),
                    torch.cat([v[:, :, :P].gather(2, idx), v[:, :, P:]], 2),
                )
            valid = valid.gather(1, order)
        return logits, kv, valid

    def _generate_chunk(
        self,
        prompts: list[list[int]],
        n: int,
        params: SamplingParams,
        budget: BudgetTracker | None,
        ends: list[int],
        stops: tuple[str, ...],
    ):
        """The chunk's completions and log-probs; a row ends at a token of ``ends`` (EOS and
        stop ids) or once its tail holds one of the ``stops`` strings."""
        P, T, g = max(len(p) for p in prompts), params.max_new_tokens, len(prompts)
        nkv, hd, dt = self.nkv, self.hd, self.dtype
        logits, kv, valid = self._prefill(prompts)  # [g, V], caches [g, nkv, P, hd], [g, P]

        # Each prompt's cache is kept once for its n samples (key-head major for the decode
        # steps); each sample row gets its own cache for the tokens it generates.
        B = g * n
        rep = torch.arange(g).repeat_interleave(n)  # [B] the prompt of each row
        caches = [
            [
                k.permute(1, 0, 3, 2).contiguous(),
                v.transpose(0, 1).contiguous(),
                torch.zeros(nkv, B, hd, T, dtype=dt),
                torch.zeros(nkv, B, T, hd, dtype=dt),
            ]
            for k, v in kv
        ]
        lens = valid.sum(-1)  # [g] true prompt lengths
        kernel = self.kernel
        bias = None
        if kernel is None:
            bias = torch.zeros(1, B, 1, P + T)
            bias[:, :, :, :P].masked_fill_(~valid[rep][None, :, None, :], float("-inf"))
        st = _DecodeState(
            groups=g,
            n=n,
            rep=self.nh // nkv,
            caches=caches,
            pstart=P - lens,
            alive=torch.arange(B),
            group=rep.clone(),
            bias=bias,
            kernel=kernel,
        )
        logits = logits[rep]
        next_pos = lens[rep]  # [B] position of the first new token
        out = [[] for _ in range(B)]
        out_lp = [[] for _ in range(B)]
        fin = torch.zeros(B, dtype=torch.bool)  # finished rows still in the batch
        eos = torch.tensor(ends)
        for t in range(T):
            banned = eos if t < params.min_new_tokens else None
            force = None if budget is None else self._forced(budget, st.alive, logits, params, banned)
            tok, lp = self._sample(logits, params, banned)  # [b]
            if force is not None:  # rows writing the thinking budget's closing phrase
                rows, ftok, flp = force
                tok[rows], lp[rows] = ftok, flp
            for r, tk, lv, f in zip(st.alive.tolist(), tok.tolist(), lp.tolist(), fin.tolist()):
                if not f:
                    out[r].append(tk)
                    out_lp[r].append(lv)
                    if budget is not None:
                        budget.observe(r, out[r])
            done = torch.isin(tok, eos)
            if stops:
                done |= torch.tensor([hits_stop(self.tok, out[r], stops) for r in st.alive.tolist()])
            fin |= done
            if t == T - 1 or bool(fin.all()):
                break
            # Drop finished rows once a quarter of the batch has finished: copying the generated
            # caches costs about as much as a decode step, so not after every single finish.
            if int(fin.sum()) >= max(1, fin.numel() // 4):
                keep = (~fin).nonzero().squeeze(-1)
                tok, next_pos, fin = tok[keep], next_pos[keep], fin[keep]
                st.drop(keep)
            st.t = t
            logits = self._decode_step(tok, next_pos, st)
            next_pos = next_pos + 1
        return out, out_lp

    @staticmethod
    def _forced(
        budget: BudgetTracker, alive: Tensor, logits: Tensor, params: SamplingParams, banned: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """The batch rows that must emit a forced token this step, those tokens, and their
        log-probs under the distribution the other rows sample from; None if no row must.
        Called before sampling, which overwrites ``logits``."""
        want = [budget.next_forced(r, logits[i]) for i, r in enumerate(alive.tolist())]
        rows = [i for i, w in enumerate(want) if w is not None]
        if budget.min_thinking:  # rows under the minimum that sample: no closing tag yet
            early = [i for i, r in enumerate(alive.tolist()) if want[i] is None and budget.must_think(r)]
            if early:
                logits[torch.tensor(early)[:, None], torch.tensor(budget.close_starts)[None]] = float("-inf")
        if not rows:
            return None
        idx, ftok = torch.tensor(rows), torch.tensor([want[i] for i in rows])
        return idx, ftok, forced_logps(logits[idx], ftok, params.temperature, banned)
