"""The ``hf`` backend: ``transformers`` ``generate``, on any device and any model."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from thinkrl import device
from thinkrl.rollout.base import ENGINES, Engine, Rollout, SamplingParams, _as_list, cut_at_end


@ENGINES.register("hf")
class HFEngine(Engine):
    """Reference engine: ``transformers`` ``generate`` on left-padded batches, on whichever
    device the model is on. Log-probs are of softmax(logits / temperature) with banned end tokens
    removed (:class:`_LogpRecorder`): the distribution the fast engine reports, except under
    ``min_thinking``, whose ban on closing the thinking early is applied after the recorder
    and so is not in these log-probs."""

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
                    batch = flat[s : s + self.batch_size]
                    budget = self._budget(flat_text[s : s + self.batch_size], batch, params)
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
        return Rollout(
            prompt_ids=flat,
            completion_ids=completions,
            texts=texts,
            truncated=truncated,
            logps=logps,
            forced=forced if params.shapes_thinking else None,
        )

    def _budget(self, prompts: list[str], batch: list[list[int]], params: SamplingParams):
        """A logits processor that enforces ``params.thinking_budget`` and ``min_thinking`` on a
        batch (the prompts' text and ids), or None without either."""
        if not params.shapes_thinking:
            return None
        from thinkrl.rollout.thinking import BudgetLogitsProcessor, budget_tracker

        tracker, self._closing = budget_tracker(self.tok, params, prompts, self._closing)
        return BudgetLogitsProcessor(tracker, max(len(x) for x in batch))

    def _generate_batch(
        self, batch: list[list[int]], params: SamplingParams, ends: list[int], budget=None
    ) -> tuple[list[list[int]], list[list[float]]]:
        """Sampled tokens [b][T] and their log-probs [b][T] (T: the batch's longest run)."""
        pad = self.tok.pad_token_id
        width = max(len(x) for x in batch)
        dev = _device_of(self.model)
        input_ids = device.to(
            torch.tensor([[pad] * (width - len(x)) + x for x in batch]), dev
        )  # [b, P] left-padded
        attn = device.to(torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch]), dev)  # [b, P]
        greedy = params.temperature <= 0
        kwargs = dict(
            max_new_tokens=params.max_new_tokens,
            do_sample=not greedy,
            pad_token_id=pad,
            eos_token_id=ends,
            min_new_tokens=params.min_new_tokens or None,
        )
        if not greedy:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        recorder = _LogpRecorder(1.0 if greedy else params.temperature)
        kwargs["logits_processor"] = [recorder] + ([budget] if budget is not None else [])
        with device.autocast(self.bf16, dev):
            out = self.model.generate(input_ids=input_ids, attention_mask=attn, **kwargs)  # [b, P + T]
        toks = out[:, width:]  # [b, T]
        return toks.tolist(), recorder.finish(toks).tolist()


class _LogpRecorder(LogitsProcessor):
    """Records the log-prob of each sampled token under softmax(scores / temperature), where
    ``scores`` are what ``generate``'s own processors left (end tokens banned before
    ``min_new_tokens``) and before its temperature, top-k and top-p warpers, which run after
    the processors a caller passes. A call sees the token chosen after the previous call, so
    only one [b, V] distribution is kept at a time (``output_logits`` would keep all T)."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.last: torch.Tensor | None = None  # [b, V] log-probs of the step being sampled
        self.out: list[torch.Tensor] = []  # [b] per step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.last is not None:
            self.out.append(self.last.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.last = torch.log_softmax(scores.float() / self.temperature, -1)
        return scores

    def finish(self, toks: torch.Tensor) -> torch.Tensor:
        """The log-probs [b, T] of the generated tokens ``toks`` [b, T]."""
        if self.last is not None and len(self.out) < toks.shape[1]:
            self.out.append(self.last.gather(-1, toks[:, -1:]).squeeze(-1))
        return torch.stack(self.out, 1) if self.out else toks.new_zeros(toks.shape, dtype=torch.float32)


def _device_of(model) -> str:
    return str(next(model.parameters()).device)
