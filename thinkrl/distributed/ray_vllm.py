"""``rollout.backend=vllm``: vLLM in a rollout worker (``pip install thinkrl[vllm]``, a CUDA machine).

The glue is three pure functions, tested without vLLM (tests/distributed/test_ray_backends.py)
against vLLM's documented interfaces (the version pinned in pyproject's ``vllm`` extra):

- :func:`vllm_weights`: the learner's state dict as the ``(name, tensor)`` pairs that a vLLM
  model's ``load_weights`` takes. vLLM maps HF checkpoint names itself (it stacks q/k/v into
  ``qkv_proj``), so the mapping is: HF names, without peft's ``base_model.model.`` prefix and
  LoRA tensors, without rotary ``inv_freq`` buffers, and without ``lm_head.weight`` when the
  embeddings are tied (vLLM's tied models skip it too).
- :func:`vllm_sampling_kwargs`: our :class:`~thinkrl.rollout.SamplingParams` as the keyword
  arguments of ``vllm.SamplingParams``: ``max_tokens``, ``temperature``, ``top_p``, ``top_k``
  (0: off, in vLLM as here), a per-sequence ``seed``, ``logprobs=0`` (the sampled token's
  log-prob only), ``n=1``.
- :func:`sampled_logprobs`: the sampled tokens' log-probs from a ``CompletionOutput``
  (``token_ids`` and ``logprobs``, a list of ``{token_id: Logprob}`` dicts). The engine is
  built with ``logprobs_mode="processed_logprobs"`` so that they are log-probs of
  softmax(logits / T), the learner's convention, not of the raw logits.

Weight updates use vLLM's documented RLHF path: a worker extension class whose method
``update_weights`` calls the model's ``load_weights``, reached through ``LLM.collective_rpc``.
Colocated placement (``ray.placement=colocated``) builds the engine with
``enable_sleep_mode=True`` and sleeps it (level 1: weights offloaded, KV cache freed) after
each iteration, waking it before the next weight update.

Not run here: vLLM cannot be installed on the development machines (no GPU) nor brought to
the offline GPU machine (its wheels are too large). docs/distributed-ray.md says so.
"""

from __future__ import annotations

from thinkrl.distributed.ray_engine import MASK64, Seq, _mix
from thinkrl.rollout import SamplingParams


def vllm_weights(state: dict, tie_word_embeddings: bool) -> list[tuple[str, object]]:
    out = []
    for name, t in state.items():
        if name.startswith("base_model.model."):
            name = name[len("base_model.model.") :]
        if "lora_" in name or name.endswith("rotary_emb.inv_freq"):
            continue
        if tie_word_embeddings and name == "lm_head.weight":
            continue
        out.append((name.replace(".base_layer.", "."), t))
    return out


def vllm_sampling_kwargs(params: SamplingParams, max_tokens: int, seed: int) -> dict:
    return {
        "n": 1,
        "max_tokens": max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k or 0,
        "min_tokens": params.min_new_tokens,
        "seed": seed,
        "logprobs": 0,
    }


def sampled_logprobs(output) -> tuple[list[int], list[float]]:
    """``output``: a vLLM ``CompletionOutput`` (or anything with ``token_ids`` and ``logprobs``)."""
    ids = list(output.token_ids)
    if output.logprobs is None or len(output.logprobs) != len(ids):
        raise ValueError("vLLM returned no log-prob per sampled token; sampling needs logprobs=0")
    return ids, [float(step[t].logprob) for t, step in zip(ids, output.logprobs)]


class WorkerExtension:
    """Mixed into vLLM's GPU workers (``worker_extension_cls``); ``self.model_runner`` is vLLM's."""

    def update_weights(self, named_tensors: list) -> bool:
        self.model_runner.model.load_weights(weights=named_tensors)
        return True


class VLLMEngine:
    def __init__(self, llm, tie_word_embeddings: bool, colocated: bool):
        self.llm, self.tied, self.colocated = llm, tie_word_embeddings, colocated
        self.asleep = False

    @classmethod
    def create(cls, model, tok, colocated: bool = False) -> VLLMEngine:
        import tempfile

        from vllm import LLM  # the vllm extra

        folder = tempfile.mkdtemp(prefix="thinkrl-vllm-")
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        llm = LLM(
            model=folder,
            enable_sleep_mode=colocated,
            logprobs_mode="processed_logprobs",
            worker_extension_cls="thinkrl.distributed.ray_vllm.WorkerExtension",
        )
        return cls(llm, bool(getattr(model.config, "tie_word_embeddings", False)), colocated)

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def load_state_dict(self, state: dict, version: int = 0) -> None:
        self._wake()
        self.llm.collective_rpc("update_weights", args=(vllm_weights(state, self.tied),))

    def continue_(
        self, seqs: list[Seq], budget: int, params: SamplingParams, seed: int, version: int
    ) -> None:
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        self._wake()
        todo = [s for s in seqs if not s.done]
        prompts = [TokensPrompt(prompt_token_ids=s.prompt_ids + s.tokens) for s in todo]
        sps = [
            VSP(
                **vllm_sampling_kwargs(
                    params,
                    min(budget, params.max_new_tokens - len(s.tokens)),
                    _mix(_mix(seed & MASK64) ^ s.uid ^ (len(s.tokens) << 40)) >> 33,
                )
            )
            for s in todo
        ]
        outs = self.llm.generate(prompts, sps, use_tqdm=False)
        for s, out in zip(todo, outs):
            c = out.outputs[0]
            ids, lps = sampled_logprobs(c)
            s.tokens += ids
            s.logps += lps
            s.versions += [version] * len(ids)
            s.iters += 1
            if c.finish_reason == "stop":
                s.done = True
            elif len(s.tokens) >= params.max_new_tokens:
                s.done = s.truncated = True
        if self.colocated:
            self.llm.sleep(level=1)  # the learner's turn on the GPU
            self.asleep = True
