"""Slot-based incremental decoding: the engine behind continuous batching.

The rollout engine (``fast.py``) decodes a fixed batch from start to end. A server instead
sees requests arrive and leave at any time (Orca, Yu et al. 2022, "iteration-level
scheduling"; vLLM's continuous batching): each decode step runs every sequence that is live
at that moment, a new request joins the batch between two steps, and a finished one leaves
it at once.

:class:`SlotDecoder` keeps one key/value cache of ``max_slots`` rows x ``max_len`` positions
per layer. A sequence owns a *slot*:

- ``add(ids, params)`` prefills a prompt into a free slot;
- ``extend(slot, ids)`` appends tokens (a tool's observation, the user's next turn) to a
  slot's cache without running its history again;
- ``step()`` samples one token for every active slot, feeds it to the model in one batched
  forward pass, and returns what each slot emitted;
- ``free(slot)`` gives the slot back;
- ``finished(slot)``, ``generated(slot)``, ``forced(slot)``, ``length(slot)`` read its state.

A slot that finished keeps its cache (its last token included) until ``free``, so that
``extend`` can continue it: a tool's observation, then ``step`` again. :class:`HFSlotDecoder`
offers the same API on HF ``transformers`` with one slot, for models the fast engine does
not run.

Invariants: a slot's cache holds every token of its sequence, including the last one
``step`` emitted, and ``_next`` holds the logits that predict the token after them. Live
slots occupy rows ``0..n-1`` of the cache (a freed row is filled by moving the last live row
into it, one row copy), so a decode step reads a contiguous ``[:n]`` view: no gather of
caches per step. Slot ids given to callers stay stable; ``_row`` maps them to rows.

The weights, the prefill forward pass and the samplers are the fast engine's own
(:class:`thinkrl.rollout.fast.FastEngine`); only the per-row decode step is new, because
rows here sit at different lengths. Greedy output of a slot equals HF ``generate``
(tests/rollout/test_slots.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from thinkrl.rollout import SamplingParams
from thinkrl.rollout.fast import FastEngine, _rms
from thinkrl.rollout.thinking import BudgetTracker, budget_tracker, forced_logps


class SlotsFull(RuntimeError):
    """Every slot is taken (a server answers 429)."""


class SequenceTooLong(ValueError):
    """A slot's tokens would not fit in ``max_len`` positions (a server answers 400)."""


@dataclass
class Emitted:
    """What one slot produced in one ``step``."""

    slot: int
    token: int
    logp: float  # log-prob under the temperature-scaled distribution (temperature 1 when greedy)
    forced: bool = False  # written by the thinking budget's closing phrase, not sampled
    finished: bool = False  # EOS, max_new_tokens reached, or the cache is full: call free()
    reason: str | None = None  # "stop" (EOS) or "length" once finished
    top: list[tuple[int, float]] | None = None  # the most likely tokens and their log-probs, if asked for


@dataclass
class _Slot:
    params: SamplingParams
    length: int = 0  # tokens in the cache
    generated: list[int] = field(default_factory=list)  # tokens emitted by step() since the last add/extend
    budget: BudgetTracker | None = None
    rng: Tensor | None = None  # the slot's own CPU generator state when the request is seeded
    top_logprobs: int = 0  # report this many most likely tokens per step
    finished: bool = False


class SlotDecoder:
    """Continuous-batching decoder over the fast engine's weights.

    ``engine_or_model``: a :class:`FastEngine` (its weights are used as they are) or a model
    the fast engine supports (a frozen engine is built, fp32 unless ``bf16``). Raises
    ``ConfigError`` for a model the fast engine cannot run (check
    ``thinkrl.rollout.fast.unsupported`` first and fall back to the hf engine)."""

    def __init__(self, engine_or_model, tok, max_slots: int = 8, max_len: int = 2048, bf16: bool = False):
        if isinstance(engine_or_model, FastEngine):
            eng = engine_or_model
            if eng.model is not None:
                eng.sync()
        else:
            eng = FastEngine(engine_or_model, tok, bf16=bf16, kernel=False).freeze()
        self.eng, self.tok = eng, tok
        self.max_slots, self.max_len = max_slots, max_len
        nkv, hd, dt = eng.nkv, eng.hd, eng.dtype
        self.kv = [
            (
                torch.zeros(max_slots, nkv, max_len, hd, dtype=dt),
                torch.zeros(max_slots, nkv, max_len, hd, dtype=dt),
            )
            for _ in eng.layers
        ]  # per layer [slots, nkv, max_len, hd]: rows 0..n-1 live
        self._next = torch.zeros(max_slots, eng.embed.shape[0])  # [slots, V] fp32 next-token logits per row
        self._lens = torch.zeros(max_slots, dtype=torch.long)  # [slots] tokens in each row's cache
        self._slots: dict[int, _Slot] = {}
        self._row: dict[int, int] = {}  # slot id -> cache row
        self._order: list[int] = []  # row -> slot id, for rows 0..n-1
        self._ids = 0
        self.eos_ids = set(eng.eos_ids)
        self._phrases: dict | None = None  # the thinking phrases' token ids, tokenized once

    # -- bookkeeping ---------------------------------------------------------------------------

    @property
    def active(self) -> int:
        """How many slots are taken."""
        return len(self._order)

    @property
    def free_slots(self) -> int:
        return self.max_slots - len(self._order)

    def slots(self) -> list[int]:
        return list(self._order)

    def length(self, slot: int) -> int:
        """Tokens in ``slot``'s cache."""
        return self._slots[slot].length

    def finished(self, slot: int) -> bool:
        """Whether ``slot`` stopped (EOS, max_new_tokens, a full cache) since its last add/extend."""
        return self._slots[slot].finished

    def generated(self, slot: int) -> list[int]:
        """The tokens ``step`` emitted for ``slot`` since its last add/extend."""
        return list(self._slots[slot].generated)

    def forced(self, slot: int) -> list[bool] | None:
        """Per generated token, whether the thinking budget forced it (None without a budget)."""
        b = self._slots[slot].budget
        return None if b is None else list(b.forced[0])

    # -- the public API ------------------------------------------------------------------------

    @torch.inference_mode()
    def add(
        self,
        ids: list[int],
        params: SamplingParams | None = None,
        seed: int | None = None,
        prompt_text: str | None = None,
        top_logprobs: int = 0,
    ) -> int:
        """Prefill ``ids`` into a free slot and return its id. ``params`` hold for every
        ``step`` of the slot (``max_new_tokens`` counts tokens since the last add/extend);
        ``seed`` gives the slot its own random stream, so its samples do not depend on the
        other requests in the batch. ``prompt_text`` (the decoded prompt by default) tells a
        thinking budget whether the prompt already opened ``<think>``. ``top_logprobs``: each
        ``Emitted`` of the slot carries that many most likely tokens with their log-probs.
        Of ``params.stop``, stop token ids end the slot like EOS; stop strings are the
        caller's to look for (the server cuts text at them)."""
        if not ids:
            raise ValueError("a slot needs at least one prompt token")
        if not self.free_slots:
            raise SlotsFull(f"all {self.max_slots} slots are taken")
        self._check_fits(0, len(ids), params)
        params = params or SamplingParams()
        s = _Slot(params=params, top_logprobs=top_logprobs)
        seed = params.seed if seed is None else seed
        if seed is not None:
            s.rng = torch.Generator().manual_seed(int(seed)).get_state()
        if params.shapes_thinking:  # a thinking budget, or s1's minimum ("Wait")
            text = (
                prompt_text
                if prompt_text is not None
                else self.tok.decode(ids[-64:], skip_special_tokens=False)
            )
            s.budget, self._phrases = budget_tracker(self.tok, params, [text], self._phrases)
        slot, self._ids = self._ids, self._ids + 1
        self._slots[slot], self._row[slot] = s, len(self._order)
        self._order.append(slot)
        self._lens[self._row[slot]] = 0
        self._append(slot, ids)
        return slot

    @torch.inference_mode()
    def extend(self, slot: int, ids: list[int], params: SamplingParams | None = None) -> None:
        """Append ``ids`` to ``slot``'s cache (its history is not run again) and make the slot
        live again: the next ``step`` samples the token after them. ``params`` replace the
        slot's sampling parameters if given; the generated-token count restarts at 0."""
        s = self._slots[slot]
        if not ids:
            return
        self._check_fits(s.length, len(ids), params or s.params)
        if params is not None:
            s.params = params
        s.generated, s.finished = [], False
        if s.budget is not None:  # the budget's phase carries over (a later turn is not budgeted again)
            s.budget.forced[0] = []
        self._append(slot, ids)

    def finish(self, slot: int, reason: str = "stop") -> None:
        """End ``slot``'s current turn now (a caller found a stop string): it stops stepping and
        keeps its cache, so ``extend`` can continue it or ``free`` release it."""
        s = self._slots[slot]
        s.finished, s.reason = True, reason

    def free(self, slot: int) -> None:
        """Give ``slot`` back. The last live row moves into its row, so live rows stay 0..n-1."""
        if slot not in self._slots:
            return
        row, last = self._row.pop(slot), len(self._order) - 1
        del self._slots[slot]
        moved = self._order.pop()
        if moved != slot:  # move the last live row into the hole
            self._move_row(last, row)
            self._next[row], self._lens[row] = self._next[last], self._lens[last]
            self._order[row], self._row[moved] = moved, row

    def _move_row(self, src: int, dst: int) -> None:
        n = int(self._lens[src])
        for k, v in self.kv:
            k[dst, :, :n], v[dst, :, :n] = k[src, :, :n], v[src, :, :n]

    @torch.inference_mode()
    def step(self, params: dict[int, SamplingParams] | None = None) -> list[Emitted]:
        """One token for every live, unfinished slot: sample from its next-token logits, then
        run all the new tokens through the model in one batched forward pass. ``params``
        optionally replaces some slots' sampling parameters from now on. Returns one
        :class:`Emitted` per slot that stepped; a finished slot stays taken (its cache and
        tokens kept, e.g. for ``extend``) until ``free``. While finished slots sit between
        live ones, a step gathers the live rows' caches (a copy per layer) instead of reading
        them in place: free or extend finished slots soon."""
        for slot, p in (params or {}).items():
            self._slots[slot].params = p
        rows = [r for r, sl in enumerate(self._order) if not self._slots[sl].finished]
        if not rows:
            return []
        tops = self._tops(rows)
        toks, lps, forced = self._sample_rows(rows)
        out, feed = [], []
        for r, tk, lp, fz, top in zip(rows, toks, lps, forced, tops):
            slot = self._order[r]
            s = self._slots[slot]
            s.generated.append(tk)
            if s.budget is not None:
                s.budget.observe(0, s.generated)
            reason = None
            if tk in self.eos_ids or tk in s.params.stop_ids:
                reason = "stop"
            elif len(s.generated) >= s.params.max_new_tokens or s.length + 1 >= self.max_len:
                reason = "length"
            s.finished = reason is not None
            if s.length < self.max_len:
                feed.append(r)
            out.append(Emitted(slot, tk, lp, fz, s.finished, reason, top))
        by_row = dict(zip(rows, toks))
        if feed:
            self._decode(feed, [by_row[r] for r in feed])
        return out

    # -- internals -----------------------------------------------------------------------------

    def _check_fits(self, have: int, more: int, params: SamplingParams | None) -> None:
        if have + more > self.max_len:
            raise SequenceTooLong(f"{have + more} tokens do not fit the context of {self.max_len} positions")

    def _append(self, slot: int, ids: list[int]) -> None:
        """Run ``ids`` at the end of ``slot``'s cache (the fast engine's prefill forward pass,
        on a one-row view of the cache) and keep the logits of the last position."""
        r, s = self._row[slot], self._slots[slot]
        start, n = s.length, len(ids)
        view = [(k[r : r + 1], v[r : r + 1]) for k, v in self.kv]  # views: written in place
        pos = torch.arange(start, start + n)[None]  # [1, n]
        mask = torch.ones(n, start + n, dtype=torch.bool).tril(start)[None, None]  # [1, 1, n, start+n]
        self._next[r] = self.eng._forward(torch.tensor([ids]), pos, view, start, mask)[0]
        s.length = start + n
        self._lens[r] = s.length

    def _tops(self, rows: list[int]) -> list[list[tuple[int, float]] | None]:
        """Per row, its ``top_logprobs`` most likely next tokens under the distribution it
        samples from (temperature-scaled; temperature 1 when greedy), or None."""
        out = []
        for r in rows:
            s = self._slots[self._order[r]]
            if not s.top_logprobs:
                out.append(None)
                continue
            t = s.params.temperature if s.params.temperature > 0 else 1.0
            v, i = torch.log_softmax(self._next[r] / t, -1).topk(s.top_logprobs)
            out.append(list(zip(i.tolist(), v.tolist())))
        return out

    def _sample_rows(self, rows: list[int]) -> tuple[list[int], list[float], list[bool]]:
        """Sample the next token of each row in ``rows``: rows that share sampling parameters
        (and have no seed of their own) are sampled together by the fast engine's sampler."""
        toks, lps, forced = [0] * len(rows), [0.0] * len(rows), [False] * len(rows)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            s = self._slots[self._order[r]]
            p = s.params
            want = s.budget.next_forced(0, self._next[r]) if s.budget is not None else None
            ban = ()  # tokens this row may not draw now
            if len(s.generated) < p.min_new_tokens:  # no end (EOS or a stop token) yet
                ban += tuple(sorted(self.eos_ids | set(p.stop_ids)))
            if want is not None:  # the thinking budget writes its phrase
                lp = forced_logps(
                    self._next[r : r + 1],
                    torch.tensor([want]),
                    p.temperature,
                    torch.tensor(ban) if ban else None,
                )
                toks[i], lps[i], forced[i] = want, float(lp[0]), True
                continue
            if s.budget is not None and s.budget.must_think(0):  # under min_thinking: no closing tag yet
                ban += tuple(s.budget.close_starts)
            key = (p.temperature, p.top_p, p.top_k, ban, i if s.rng is not None else -1)
            groups.setdefault(key, []).append(i)
        for (temp, top_p, top_k, ban, own), idx in groups.items():
            p = SamplingParams(temperature=temp, top_p=top_p, top_k=top_k)
            banned = torch.tensor(ban) if ban else None
            logits = self._next[[rows[i] for i in idx]].clone()  # [g, V]; _sample overwrites it
            if own >= 0:  # a seeded slot draws from its own stream
                s = self._slots[self._order[rows[own]]]
                with torch.random.fork_rng(devices=[]):
                    torch.set_rng_state(s.rng)
                    tk, lp = FastEngine._sample(logits, p, banned)
                    s.rng = torch.get_rng_state()
            else:
                tk, lp = FastEngine._sample(logits, p, banned)
            for i, t, v in zip(idx, tk.tolist(), lp.tolist()):
                toks[i], lps[i] = t, v
        return toks, lps, forced

    def _decode(self, rows: list[int], toks: list[int]) -> None:
        """One new token per row of ``rows`` (each at its own length), written to the caches;
        updates those rows' next-token logits. Attention over a row's first ``len`` cache
        positions, masked per row (rows sit at different lengths)."""
        e = self.eng
        b, H = len(rows), e.embed.shape[1]
        nh, nkv, hd, dt = e.nh, e.nkv, e.hd, e.dtype
        ri = torch.tensor(rows)
        lens = self._lens[ri]  # [b] the slot each new token goes to (= its position)
        width = int(lens.max()) + 1
        contiguous = rows == list(range(rows[0], rows[0] + b))
        mask = (torch.arange(width)[None] <= lens[:, None])[:, None, None]  # [b, 1, 1, width]
        cos, sin = e._rope(lens[:, None])  # [b, 1, 1, hd]
        x = e.embed[torch.tensor(toks)].float()  # [b, H]
        for L, (kc, vc) in zip(e.layers, self.kv):
            P = L.packed or {}
            h = F.rms_norm(x, (H,), L.ln_in, e.eps).to(dt)
            qkv = e._linear(h, L.wqkv, P.get("wqkv"), L.bqkv)  # [b, (nh + 2 nkv) hd]
            q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], -1)
            q, k = q.view(b, 1, nh, hd), k.view(b, 1, nkv, hd)
            if L.qk_norm is not None:  # Qwen3
                q, k = _rms(q, L.qk_norm[:nh], e.eps).to(dt), _rms(k, L.qk_norm[nh:], e.eps).to(dt)
            q = e._rotate(q.transpose(1, 2), cos, sin)  # [b, nh, 1, hd]
            k = e._rotate(k.transpose(1, 2), cos, sin)  # [b, nkv, 1, hd]
            kc[ri, :, lens] = k[:, :, 0]
            vc[ri, :, lens] = v.view(b, nkv, hd)
            if contiguous:
                keys, vals = kc[rows[0] : rows[0] + b, :, :width], vc[rows[0] : rows[0] + b, :, :width]
            else:
                keys, vals = kc[ri, :, :width], vc[ri, :, :width]
            a = F.scaled_dot_product_attention(
                q, keys, vals, attn_mask=mask, enable_gqa=nkv != nh
            )  # [b, nh, 1, hd]
            x = x + e._linear(a.reshape(b, nh * hd), L.wo, P.get("wo")).float()
            h = F.rms_norm(x, (H,), L.ln_post, e.eps).to(dt)
            gate, up = e._linear(h, L.wgu, P.get("wgu")).chunk(2, -1)  # [b, I] each
            x = x + e._linear(F.silu(gate) * up, L.wd, P.get("wd")).float()
        h = F.rms_norm(x, (H,), e.ln_final, e.eps).to(dt)
        self._next[ri] = e._linear(h, e.head, e.head_packed).float()  # [b, V]
        self._lens[ri] = lens + 1
        for r in rows:
            self._slots[self._order[r]].length += 1


class HFSlotDecoder(SlotDecoder):
    """The same API over HF ``transformers`` with one slot, for models the fast engine does
    not run (``thinkrl.rollout.fast.unsupported``): requests are served one at a time, each
    with the model's own key/value cache object. Sampling, seeds, budgets and stopping are
    :class:`SlotDecoder`'s."""

    def __init__(self, model, tok, max_len: int = 2048):
        self.model, self.tok = model.eval(), tok
        self.max_slots, self.max_len = 1, max_len
        self._next = torch.zeros(1, model.get_output_embeddings().weight.shape[0])
        self._lens = torch.zeros(1, dtype=torch.long)
        self._slots, self._row, self._order, self._ids = {}, {}, [], 0
        eos = model.generation_config.eos_token_id
        self.eos_ids = {tok.eos_token_id, *([eos] if isinstance(eos, int) else list(eos or []))} - {None}
        self._phrases = None
        self._past = None
        import inspect  # transformers renamed past_key_values to cache (5.x)

        self._cache_kw = (
            "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        )

    def _move_row(self, src: int, dst: int) -> None:  # one slot: rows never move
        pass

    def free(self, slot: int) -> None:
        super().free(slot)
        if not self._order:
            self._past = None

    def _append(self, slot: int, ids: list[int]) -> None:
        s = self._slots[slot]
        if s.length == 0:
            self._past = None
        self._run(ids)
        s.length += len(ids)
        self._lens[0] = s.length

    def _run(self, ids: list[int]) -> None:
        out = self.model(torch.tensor([ids]), use_cache=True, **{self._cache_kw: self._past})
        self._past = getattr(out, self._cache_kw)
        self._next[0] = out.logits[0, -1].float()

    def _decode(self, rows: list[int], toks: list[int]) -> None:
        self._run(toks)
        s = self._slots[self._order[0]]
        s.length += 1
        self._lens[0] = s.length
