"""Randomly initialised models with the architecture of real ones, built from the config files
in ``thinkrl/models/configs/`` (the numbers of each model's published ``config.json``), so that
a speed or memory check on a GPU needs no weights to travel.

- ``smollm2-135m``: SmolLM2-135M(-Instruct), a Llama: 30 layers, hidden 576, 9 query heads over
  3 key/value heads, MLP 1536, vocabulary 49152, tied embeddings; 134,515,008 parameters.
- ``qwen2.5-1.5b``: Qwen2.5-1.5B, a Qwen2: 28 layers, hidden 1536, 12 query heads over 2
  key/value heads, MLP 8960, q/k/v biases, vocabulary 151936, tied embeddings;
  1,543,714,304 parameters.

With a tokenizer, the special-token ids are set to that tokenizer's (the architecture numbers
are kept), so generation stops where the tokenizer says; the vocabulary stays the model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIGS = Path(__file__).parent / "configs"


def arch_names() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.json"))


def arch_config(name: str, tokenizer=None):
    """The transformers config of architecture ``name``; raises ModelError listing the names."""
    from transformers import AutoConfig

    from thinkrl.models import ModelError

    path = CONFIGS / f"{name}.json"
    if not path.is_file():
        raise ModelError(f"architecture '{name}' unknown; choose from: {', '.join(arch_names())}")
    raw = json.loads(path.read_text())
    if tokenizer is not None:
        raw.update(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    kind = raw.pop("model_type")
    raw.pop("architectures", None)
    return AutoConfig.for_model(kind, **raw)


def build_random(
    name: str, tokenizer=None, *, device: str = "cpu", seed: int = 0, dtype: torch.dtype = torch.float32
):
    """A randomly initialised causal LM of architecture ``name`` on ``device`` (``"meta"``
    allocates nothing: for counting parameters), initialised from ``seed``."""
    from transformers import AutoModelForCausalLM

    config = arch_config(name, tokenizer)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if tokenizer is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def n_params(model) -> int:
    """Parameters, counting tied tensors once."""
    return sum(p.numel() for p in model.parameters())


def save_random(name: str, dst: Path, seed: int = 0) -> Path:
    """Write a random model of architecture ``name`` with the tiny byte-level tokenizer to
    ``dst`` (an HF folder ``thinkrl train model=DST`` loads)."""
    from thinkrl.models import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = build_random(name, tok, seed=seed)
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return Path(dst)
