"""``rollout.backend=openai``: any OpenAI-compatible server as a rollout worker's engine.

Each unfinished sequence is one ``POST {server_url}/completions`` request with the token ids
so far as the prompt (OpenAI's API takes a list of token ids; vLLM's and SGLang's servers do
too), ``max_tokens`` = the iteration's budget, a per-sequence ``seed``, and ``logprobs: 1``
for the behaviour log-probs. ``return_tokens_as_token_ids`` (a vLLM extension, ignored
elsewhere) makes the tokens come back as ``token_id:N``, so the worker gets ids, not strings
to re-tokenize.

Weight sync goes through files: the worker writes the new weights as an HF folder and asks
the server to load it (``POST {server_url}/load_weights {"path": ..., "version": N}``; the
test's stub server and a small wrapper around ``vllm serve`` implement it). A server that
cannot take new weights fails the first sync after version 0 with one clear message instead
of training on samples from weights it never had.
"""

from __future__ import annotations

import json
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from thinkrl.distributed.ray_engine import MASK64, Seq, _mix
from thinkrl.distributed.ray_worker import WeightSyncError
from thinkrl.rollout import SamplingParams


def request_body(model: str | None, ids: list[int], budget: int, params: SamplingParams, seed: int) -> dict:
    """The /v1/completions request that continues one sequence (sampling parameters translated:
    top_k 0 means off, as in vLLM's server, and is left out for servers without it)."""
    body = {
        "prompt": ids,
        "max_tokens": budget,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "seed": seed,
        "logprobs": 1,
        "n": 1,
        "return_tokens_as_token_ids": True,
    }
    if params.top_k:
        body["top_k"] = params.top_k
    if model:
        body["model"] = model
    return body


def parse_choice(choice: dict, tok) -> tuple[list[int], list[float], str]:
    """Token ids, their log-probs and the finish reason from one completion choice."""
    lp = choice.get("logprobs") or {}
    toks, lps = lp.get("tokens"), lp.get("token_logprobs")
    if toks is None or lps is None:
        raise WeightSyncError(
            "the OpenAI-compatible server returned no per-token logprobs; thinkrl needs them "
            "(the request asks for logprobs=1)"
        )
    ids = [
        int(t.split(":", 1)[1])
        if isinstance(t, str) and t.startswith("token_id:")
        else tok.convert_tokens_to_ids(t)
        for t in toks
    ]
    return ids, [float(x) for x in lps], choice.get("finish_reason") or "length"


class OpenAIEngine:
    def __init__(self, server_url: str, tok, model_name: str | None = None, timeout_s: float = 600.0):
        self.url, self.tok, self.model_name, self.timeout_s = (
            server_url.rstrip("/"),
            tok,
            model_name,
            timeout_s,
        )
        self.model = None  # set by the worker: the model whose weights are written for the server
        self.version = 0

    def _post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise WeightSyncError(f"{self.url}{path} answered HTTP {e.code}: {e.read()[:300]!r}") from None
        except (urllib.error.URLError, TimeoutError) as e:
            raise WeightSyncError(
                f"{self.url}{path} did not answer within {self.timeout_s:g} s: {e}"
            ) from None

    def load_state_dict(self, state: dict, version: int = 0) -> None:
        if version == 0:
            return  # the server is assumed to serve the run's initial model (rollout.server_model)
        if self.model is None:
            raise WeightSyncError("rollout.backend=openai: no model to write the new weights from")
        self.model.load_state_dict(state)
        folder = Path(tempfile.mkdtemp(prefix=f"thinkrl-weights-v{version}-"))
        self.model.save_pretrained(folder)
        try:
            got = self._post("/load_weights", {"path": str(folder), "version": version})
        except WeightSyncError as e:
            raise WeightSyncError(
                f"rollout.backend=openai: the server at {self.url} could not take the weights of "
                f"policy version {version} ({e}); it needs a POST /load_weights endpoint "
                "(docs/distributed-ray.md)"
            ) from None
        if got.get("version") != version:
            raise WeightSyncError(
                f"the server at {self.url} confirmed version {got.get('version')} instead of {version}"
            )
        self.version = version

    def continue_(
        self, seqs: list[Seq], budget: int, params: SamplingParams, seed: int, version: int
    ) -> None:
        for s in seqs:
            if s.done:
                continue
            n = min(budget, params.max_new_tokens - len(s.tokens))
            req_seed = (
                _mix(_mix(seed & MASK64) ^ s.uid ^ (len(s.tokens) << 40)) >> 33
            )  # 31 bits: servers take int32
            out = self._post(
                "/completions", request_body(self.model_name, s.prompt_ids + s.tokens, n, params, req_seed)
            )
            ids, lps, finish = parse_choice(out["choices"][0], self.tok)
            s.tokens += ids
            s.logps += lps
            s.versions += [version] * len(ids)
            s.iters += 1
            if finish == "stop":
                s.done = True
            elif len(s.tokens) >= params.max_new_tokens:
                s.done = s.truncated = True
