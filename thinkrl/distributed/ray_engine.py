"""The rollout workers' engines: continue sequences by a bounded number of tokens.

A rollout worker does not call ``generate(prompts, n, params)`` once per step, as the
single-process loop does. Two things it needs are not in that interface today:

- **Continuing a sequence** (Kimi k1.5's partial rollouts, section 2.6.1): an iteration gives
  each unfinished sequence at most ``rollout.partial_tokens`` new tokens, and the next
  iteration continues it, under newer weights, from its prompt plus the tokens so far
  (re-prefilled: the worker keeps no cache between iterations, so any worker can continue any
  sequence, and a restarted worker loses nothing).
- **Per-sequence seeded sampling**: token t of sequence ``uid`` is drawn with the uniform
  ``token_uniform(seed, uid, t)``, whatever batch it shares and whichever worker runs it. This
  is what makes a run independent of how sequences are split across workers and iterations:
  the staleness-0 run equals the synchronous run, and a partial rollout with frozen weights
  equals a one-shot rollout (tests/distributed/test_ray.py). The fast engine draws one
  ``torch.rand`` per batch row from the process's generator instead, so its samples depend on
  the batch they share.

:class:`SeededEngine` does this with the ``transformers`` model and its KV cache within an
iteration. The ``openai`` and ``vllm`` backends (ray_openai.py, ray_vllm.py) continue a
sequence by sending prompt + tokens so far as the prompt, with ``max_tokens`` and a seed.
When the engine interface gains ``SamplingParams.seed`` and ``sync_weights(model)``, this
adapter is where it plugs in.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from thinkrl.rollout import SamplingParams, autocast

MASK64 = (1 << 64) - 1


@dataclass
class Seq:
    """One sampled completion, possibly still unfinished."""

    uid: int  # global sample id, given by the driver when the prompt is drawn; seeds its sampling
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)  # behaviour log-probs of ``tokens``
    versions: list[int] = field(default_factory=list)  # the policy version that sampled each token
    iters: int = 0  # rollout iterations it has spanned
    done: bool = False  # ended with an end-of-sequence token or at max_new_tokens
    truncated: bool = False  # stopped at max_new_tokens without an end-of-sequence token


def _mix(x: int) -> int:
    """splitmix64's finaliser: a bijection on 64-bit integers that scatters nearby inputs."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & MASK64
    return x ^ (x >> 31)


def token_uniform(seed: int, uid: int, t: int) -> float:
    """The uniform in [0, 1) that draws token ``t`` of sequence ``uid`` in a run seeded ``seed``."""
    return (_mix(_mix(_mix(seed & MASK64) ^ uid) ^ t) >> 11) / float(1 << 53)


def sample_token(logits: torch.Tensor, u: float, params: SamplingParams) -> tuple[int, float]:
    """Draw one token from logits [V] with the uniform ``u`` (inverse CDF over the top-k/top-p
    filtered distribution); returns it and its log-prob under the unfiltered softmax(logits / T),
    the same convention as the fast engine's log-probs."""
    if params.temperature <= 0:
        tok = int(logits.argmax())
        return tok, float(torch.log_softmax(logits.float(), -1)[tok])
    z = logits.float() / params.temperature  # [V]
    logp = torch.log_softmax(z, -1)  # [V]
    probs = logp.exp()
    if params.top_k and params.top_k < z.numel():
        kth = torch.topk(z, params.top_k).values[-1]
        probs = probs.masked_fill(z < kth, 0.0)
    if params.top_p < 1.0:
        sp, idx = torch.sort(probs, descending=True)
        drop = sp.cumsum(-1) - sp > params.top_p  # keep the smallest set reaching top_p
        probs = probs.scatter(-1, idx, sp.masked_fill(drop, 0.0))
    cdf = probs.double().cumsum(-1)  # [V]
    tok = int(
        torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=torch.float64), right=True).clamp(
            max=z.numel() - 1
        )
    )
    return tok, float(logp[tok])


class SeededEngine:
    """Continue sequences with a ``transformers`` causal LM: per-sequence seeded sampling, a KV
    cache within one call, re-prefill across calls."""

    def __init__(self, model, tokenizer, *, batch_size: int = 64, bf16: bool = False):
        self.model, self.tok, self.batch_size, self.bf16 = model.eval(), tokenizer, batch_size, bf16
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = {tokenizer.eos_token_id, *eos} - {None}
        # transformers renamed the KV cache argument (and output field) past_key_values -> cache
        self._cache_kw = (
            "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        )

    def load_state_dict(self, state: dict, version: int = 0) -> None:
        self.model.load_state_dict(state)

    @torch.inference_mode()
    def continue_(
        self, seqs: list[Seq], budget: int, params: SamplingParams, seed: int, version: int
    ) -> None:
        """Give every unfinished sequence at most ``budget`` new tokens (and never more than
        ``params.max_new_tokens`` in all), in place, tagging them with ``version``."""
        todo = [s for s in seqs if not s.done]
        for i in range(0, len(todo), self.batch_size):
            self._run(todo[i : i + self.batch_size], budget, params, seed, version)

    def _run(self, seqs: list[Seq], budget: int, params: SamplingParams, seed: int, version: int) -> None:
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        rows = [s.prompt_ids + s.tokens for s in seqs]
        L = max(map(len, rows))
        ids = torch.tensor([[pad] * (L - len(r)) + r for r in rows])  # [b, L] left-padded
        attn = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])  # [b, L]
        pos = (attn.cumsum(-1) - 1).clamp(min=0)  # [b, L]
        limit = [
            min(len(s.tokens) + budget, params.max_new_tokens) for s in seqs
        ]  # total tokens after this call
        cache = None
        for _ in range(max(lim - len(s.tokens) for lim, s in zip(limit, seqs))):
            with autocast(self.bf16):
                out = self.model(
                    input_ids=ids,
                    attention_mask=attn,
                    position_ids=pos,
                    use_cache=True,
                    logits_to_keep=1,
                    **{self._cache_kw: cache},
                )
            cache = getattr(out, self._cache_kw)
            logits = out.logits[:, -1].float()  # [b, V]
            nxt = []
            for r, s in enumerate(seqs):
                if s.done or len(s.tokens) >= limit[r]:
                    nxt.append(pad)
                    continue
                tok, lp = sample_token(logits[r], token_uniform(seed, s.uid, len(s.tokens)), params)
                s.tokens.append(tok)
                s.logps.append(lp)
                s.versions.append(version)
                nxt.append(tok)
                if tok in self.eos_ids:
                    s.done = True
                elif len(s.tokens) >= params.max_new_tokens:
                    s.done = s.truncated = True
            if all(s.done or len(s.tokens) >= lim for s, lim in zip(seqs, limit)):
                break
            ids = torch.tensor(nxt)[:, None]  # [b, 1]
            attn = torch.cat([attn, torch.ones(len(seqs), 1, dtype=attn.dtype)], -1)  # [b, L + t]
            pos = pos[:, -1:] + 1  # [b, 1]
        for s in seqs:
            s.iters += 1


def build_worker_engine(cfg, model, tok, bf16: bool):
    """The engine a rollout worker holds for ``rollout.backend``."""
    backend = cfg.rollout.backend
    if backend in ("fast", "hf"):
        # Both run the model in-process: the seeded engine on the transformers model (the fast
        # engine's batch-shared RNG would tie samples to the worker split; see the docstring).
        return SeededEngine(model, tok, batch_size=cfg.rollout.batch_size, bf16=bf16)
    if backend == "openai":
        from thinkrl.distributed.ray_openai import OpenAIEngine

        engine = OpenAIEngine(
            cfg.rollout.server_url,
            tok,
            model_name=cfg.rollout.server_model,
            timeout_s=cfg.ray.rollout_timeout_s,
        )
        engine.model = model  # the weights it writes for the server at each sync
        return engine
    if backend == "vllm":
        from thinkrl.distributed.ray_vllm import VLLMEngine

        return VLLMEngine.create(model, tok, colocated=cfg.ray.placement == "colocated")
    from thinkrl.config import ConfigError

    raise ConfigError(f"rollout.backend '{backend}' unknown; choose from: fast, hf, vllm, openai")
