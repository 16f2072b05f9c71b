"""The ``hf`` backend: ``transformers`` ``generate``, on any device and any model."""

from __future__ import annotations

import torch

from thinkrl import device
from thinkrl.rollout.base import ENGINES, Engine, Rollout, SamplingParams, _as_list, cut_at_end


@ENGINES.register("hf")
class HFEngine(Engine):
    """Reference engine: ``transformers`` ``generate`` on left-padded batches, on whichever
    device the model is on. Log-probs come from the raw logits of each step (``output_logits``),
    under softmax(logits / temperature) with banned end tokens removed: the same distribution
    the fast engine reports (except under ``min_thinking``, whose ban on closing the thinking
    early acts on the processed scores only, so that it is not in these log-probs)."""

    def __init__(self, model, tokenizer, *, batch_size: int = 64, bf16: bool = False):
        self.model, self.tok, self.batch_size, self.bf16 = model, tokenizer, batch_size, bf16
        self.eos_ids = {tokenizer.eos_token_id} | set(_as_list(model.generation_config.eos_token_id))
        self._closing: dict | None = None  # the thinking phrases' token ids, tokenized once

    def sync_weights(self, model) -> None:
        """``generate`` runs the model itself, so there is nothing to copy: only which model."""
        self.model = model

    def describe(self) -> str:
        return f"hf generate on {_device_of(self.model)}{', bf16 autocast' if self.bf16 else ''}"

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams) -> Rollout:
        tok = self.tok
        flat = [list(ids) for ids in prompt_ids for _ in range(n)]  # [N] with N = len(prompts) * n
        flat_text = tok.batch_decode(flat) if params.shapes_thinking else [""] * len(flat)
        ends = self.eos_ids | set(params.stop_ids)
        completions, truncated, logps, forced = [], [], [], []
        was_training = self.model.training
        self.model.eval()
        try:
            with device.seeded(params.seed, _device_of(self.model)):
                for s in range(0, len(flat), self.batch_size):
                    batch = flat[s: s + self.batch_size]
                    budget = self._budget(flat_text[s: s + self.batch_size], batch, params)
                    for ids, lp in zip(*self._generate_batch(batch, params, sorted(ends), budget)):
                        ids, stopped = cut_at_end(tok, ids, ends, params.stop_strings)
                        completions.append(ids)
                        logps.append(lp[: len(ids)])
                        truncated.append(not stopped)
                    if budget is not None:
                        forced += budget.finish(completions[s:])
        finally:
            self.model.train(was_training)
        texts = tok.batch_decode(completions, skip_special_tokens=True)
        return Rollout(prompt_ids=flat, completion_ids=completions, texts=texts, truncated=truncated, logps=logps,
                       forced=forced if params.shapes_thinking else None)

    def _budget(self, prompts: list[str], batch: list[list[int]], params: SamplingParams):
        """A logits processor that enforces ``params.thinking_budget`` and ``min_thinking`` on a
        batch (the prompts' text and ids), or None without either."""
        if not params.shapes_thinking:
            return None
        from thinkrl.rollout.thinking import BudgetLogitsProcessor, budget_tracker

        tracker, self._closing = budget_tracker(self.tok, params, prompts, self._closing)
        return BudgetLogitsProcessor(tracker, max(len(x) for x in batch))

    def _generate_batch(self, batch: list[list[int]], params: SamplingParams, ends: list[int],
                        budget=None) -> tuple[list[list[int]], list[list[float]]]:
        """Sampled tokens [b][T] and their log-probs [b][T] (T: the batch's longest run)."""
        pad = self.tok.pad_token_id
        width = max(len(x) for x in batch)
        dev = _device_of(self.model)
        input_ids = device.to(torch.tensor([[pad] * (width - len(x)) + x for x in batch]), dev)  # [b, P] left-padded
        attn = device.to(torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch]), dev)  # [b, P]
        greedy = params.temperature <= 0
        kwargs = dict(max_new_tokens=params.max_new_tokens, do_sample=not greedy, pad_token_id=pad,
                      eos_token_id=ends, min_new_tokens=params.min_new_tokens or None,
                      return_dict_in_generate=True, output_logits=True)
        if not greedy:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if budget is not None:
            kwargs["logits_processor"] = [budget]
        with device.autocast(self.bf16, dev):
            out = self.model.generate(input_ids=input_ids, attention_mask=attn, **kwargs)
        toks = out.sequences[:, width:]  # [b, T]
        lp = torch.zeros(toks.shape, dtype=torch.float32, device=toks.device)  # [b, T]
        for t, raw in enumerate(out.logits):  # one [b, V] per step: no [b, T, V] copy
            z = raw.float() / (1.0 if greedy else params.temperature)
            if t < params.min_new_tokens:
                z[:, ends] = float("-inf")  # banned there, as generate bans them
            lp[:, t] = torch.log_softmax(z, -1).gather(-1, toks[:, t, None]).squeeze(-1)
        return toks.tolist(), lp.tolist()


def _device_of(model) -> str:
    return str(next(model.parameters()).device)
