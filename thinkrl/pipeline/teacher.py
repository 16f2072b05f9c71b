"""A teacher behind an OpenAI-compatible chat endpoint whose replies carry the chain of
thought in ``reasoning_content`` (the field DeepSeek's API uses for R1), read with urllib.

R1 distils into small models by plain SFT on such traces (DeepSeek-AI 2025, section 2.4).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass

from thinkrl.config import ConfigError
from thinkrl.rewards import extract_answer


class EndpointError(ConfigError):
    """The teacher endpoint could not be reached or answered with something unusable."""


@dataclass
class EndpointConfig:
    base_url: str | None = None  # e.g. http://127.0.0.1:8000/v1; None: sample from the local model
    model: str = ""  # the model name the endpoint expects
    api_key_env: str = "OPENAI_API_KEY"  # read from the environment if set; never stored
    timeout: float = 120.0


def chat_completion(
    ep: EndpointConfig, messages: list[dict], *, n: int, temperature: float, max_tokens: int
) -> list[tuple[str, str]]:
    """POST ``{base_url}/chat/completions``; returns ``(reasoning_content, content)`` per choice."""
    body = {
        "model": ep.model,
        "messages": messages,
        "n": n,
        "temperature": temperature,
        "max_tokens": max_tokens,
    }
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(ep.api_key_env)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    url = ep.base_url.rstrip("/") + "/chat/completions"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=ep.timeout) as resp:
            data = json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        raise EndpointError(f"teacher endpoint {url} answered HTTP {e.code}: {e.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise EndpointError(
            f"could not reach the teacher endpoint {url}: {e}; check endpoint.base_url"
        ) from None
    except json.JSONDecodeError:
        raise EndpointError(f"teacher endpoint {url} did not answer with JSON") from None
    try:
        choices = [c["message"] for c in data["choices"]]
        return [(str(m.get("reasoning_content") or ""), str(m.get("content") or "")) for m in choices]
    except (KeyError, TypeError):
        raise EndpointError(f"teacher endpoint {url}: the reply has no choices[].message") from None


def as_response(reasoning: str, content: str) -> str:
    """One response in thinkrl's format: ``<think> reasoning </think> <answer> final </answer>``."""
    answer = extract_answer(content)
    if answer is None:
        answer = content.strip()
    return f"<think> {reasoning.strip()} </think> <answer> {answer} </answer>"
