"""Checkpoints: an HF-format model folder plus ``trainer_state.pt`` for exact resumption.

A checkpoint is written to a temporary folder and renamed into place, so a crash
mid-write never leaves a half checkpoint where a whole one is expected.

With LoRA the folder still holds a plain model (the adapter merged into a copy), so
``from_pretrained`` and ``thinkrl eval`` load it as any other; the adapter itself goes
to ``adapter/`` (peft's format), which is what a resumed run loads on top of the
untouched base weights: resuming from the merged weights would shift the base, and
with it the KL reference.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from thinkrl.config import ConfigError
from thinkrl.models import save_model
from thinkrl.trainer.common import is_lora, merged_copy

STATE_FILE = "trainer_state.pt"
ADAPTER_DIR = "adapter"  # LoRA runs: peft's adapter_config.json + adapter_model.safetensors
_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])


def save_checkpoint(path: Path, model, tokenizer, state: dict) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(merged_copy(model), tokenizer, tmp)
    if is_lora(model):
        model.save_pretrained(tmp / ADAPTER_DIR)
    torch.save(state, tmp / STATE_FILE)
    if path.exists():
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)
    return path


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    ck = Path(run_dir) / "checkpoints"
    if not ck.is_dir():
        return []
    found = []
    for p in ck.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / STATE_FILE).is_file() and (p / "config.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` step checkpoints (``final/`` is never pruned)."""
    if keep <= 0:
        return
    for _, p in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def load_state(path: Path) -> dict:
    return torch.load(Path(path) / STATE_FILE, weights_only=False)


def has_adapter(path: Path) -> bool:
    return (Path(path) / ADAPTER_DIR / "adapter_model.safetensors").is_file()


def load_adapter(model, path: Path) -> None:
    """Load the LoRA weights saved in ``path/adapter/`` into the peft-wrapped ``model``
    (same targets and rank), bit for bit."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    where = Path(path) / ADAPTER_DIR
    try:
        result = set_peft_model_state_dict(model, load_file(where / "adapter_model.safetensors"))
    except RuntimeError as e:  # a shape mismatch: another rank
        raise ConfigError(f"the LoRA adapter in {where} does not fit lora.*: {str(e).splitlines()[0]}") from None
    if result.unexpected_keys:
        raise ConfigError(f"the LoRA adapter in {where} does not fit lora.target_modules: it has "
                          f"{result.unexpected_keys[:2]}; resume with the run's own lora.* settings")
