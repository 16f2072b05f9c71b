"""Turn decoders: generate the next policy turn of many episodes, from token ids.

A decoder holds one token sequence per episode (``open``), generates a turn for some of them
(``turn``), and takes the environment's observation tokens (``extend``). It never sees text
to re-encode: what the policy sampled and what the environment said stay the exact ids.

- :class:`RePrefill` re-runs each sequence in full at every turn, on the rollout engine's
  own id-level generation (fast or hf). Simple and exact; the cost of a turn grows with the
  history.
- :class:`CacheAppend` keeps each episode's keys/values and only runs the new tokens
  (``thinkrl/rollout/slots.py``, where present); it must give the same tokens and log-probs
  as :class:`RePrefill` greedily (tested).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

from thinkrl.rollout import SamplingParams


@dataclass
class Turn:
    ids: list[int]  # the sampled tokens of the turn, EOS or the stop string's last token included
    logps: list[float] | None  # their behaviour log-probs, where the engine gives them
    stopped: str  # eos | stop (a stop string: a tool call) | length (the episode's token budget)


class TurnDecoder(Protocol):
    def open(self, prompts: list[list[int]]) -> None: ...

    def turn(
        self, rows: list[int], budgets: list[int], params: SamplingParams, stop: tuple[str, ...]
    ) -> list[Turn]: ...

    def extend(self, row: int, ids: list[int]) -> None: ...

    def close(self) -> None: ...


STOP_WINDOW = 16  # tokens decoded to look for a stop string (as the fast engine does)


def hits_stop(tok, ids: list[int], stop: tuple[str, ...]) -> bool:
    tail = tok.decode(ids[-STOP_WINDOW:], skip_special_tokens=True)
    return any(s in tail for s in stop)


def cut_turn(
    tok, ids: list[int], logps: list[float] | None, budget: int, eos: set[int], stop: tuple[str, ...]
) -> Turn:
    """The turn that ``ids`` (sampled past the end, possibly) holds: up to the first EOS or stop
    string, and at most ``budget`` tokens. Cutting a longer sample is exact: the tokens before
    the cut were sampled from the same distributions as if generation had stopped there."""
    for k, t in enumerate(ids):
        if k >= budget:
            break
        end = None
        if t in eos:
            end = "eos"
        elif stop and hits_stop(tok, ids[: k + 1], stop):
            end = "stop"
        if end is not None:
            return Turn(ids[: k + 1], None if logps is None else logps[: k + 1], end)
    k = min(budget, len(ids))
    return Turn(ids[:k], None if logps is None else logps[:k], "length")


class RePrefill:
    """Every turn re-runs the whole sequence so far (prompt, earlier turns, observations)."""

    def __init__(self, engine, tok):
        self.engine, self.tok = engine, tok
        self.seqs: list[list[int]] = []

    def open(self, prompts: list[list[int]]) -> None:
        self.seqs = [list(p) for p in prompts]  # the trainer syncs the engine's weights after each update

    def turn(
        self, rows: list[int], budgets: list[int], params: SamplingParams, stop: tuple[str, ...]
    ) -> list[Turn]:
        p = dataclasses.replace(params, max_new_tokens=max(budgets))
        raw, raw_lp = self._generate([self.seqs[r] for r in rows], p, stop)
        eos = set(self.engine.eos_ids)
        out = []
        for r, ids, lp, b in zip(rows, raw, raw_lp, budgets):
            t = cut_turn(self.tok, ids, lp, b, eos, stop)
            self.seqs[r] += t.ids
            out.append(t)
        return out

    def extend(self, row: int, ids: list[int]) -> None:
        self.seqs[row] += ids

    def close(self) -> None:
        self.seqs = []

    def _generate(self, seqs: list[list[int]], p: SamplingParams, stop: tuple[str, ...]):
        """One turn of every sequence through the engine protocol: rows end at EOS or a stop
        string (``cut_turn`` finds the same token), with their sampled log-probs."""
        ro = self.engine.generate(seqs, 1, dataclasses.replace(p, stop=tuple(stop)))
        return ro.completion_ids, ro.logps if ro.logps is not None else [None] * len(seqs)


class CacheAppend:
    """Each episode owns a slot of :class:`thinkrl.rollout.slots.SlotDecoder`: its prompt is
    prefilled once, and after an observation only the observation's tokens run (``extend``),
    appended to the slot's keys/values; the history is never run again. Live slots decode
    together, one token each per step, each at its own length; a slot waiting for its tool
    leaves the batch meanwhile. ``run_episodes`` drives it turn by turn per episode
    (``episodes._run_concurrent``) instead of in rounds. Fast engine only."""

    concurrent = True

    def __init__(self, engine, tok):
        self.engine, self.tok = engine, tok

    def slots(self, n: int, max_len: int):
        from thinkrl.rollout.slots import SlotDecoder

        return SlotDecoder(self.engine, self.tok, max_slots=n, max_len=max_len)

    def hits(self, ids: list[int], stop: tuple[str, ...]) -> bool:
        return hits_stop(self.tok, ids, stop)

    @staticmethod
    def pause(dec, slot: int) -> None:
        """End ``slot``'s turn at a stop string; it keeps its cache for the observation."""
        dec.finish(slot)


def make_decoder(engine, tok, kind: str = "auto") -> TurnDecoder:
    """``env.decoder``: cache (append to each episode's KV cache; the fast engine), reprefill
    (re-run the history every turn; any engine), or auto (cache where the engine allows)."""
    from thinkrl.rollout.fast import FastEngine

    if kind == "cache" or (kind == "auto" and isinstance(engine, FastEngine)):
        if not isinstance(engine, FastEngine):
            from thinkrl.config import ConfigError

            raise ConfigError(
                "env.decoder=cache needs rollout.backend=fast (the hf engine re-prefills: "
                "env.decoder=reprefill or auto)"
            )
        return CacheAppend(engine, tok)
    return RePrefill(engine, tok)
