"""Weighted averaging of checkpoints of one architecture.

Kimi k1.5 (Kimi Team 2025, section 2.4) merges a long-CoT and a short-CoT model by
averaging their weights as its simplest long2short method; the same operation is
"model soups" (Wortsman et al. 2022). Weights are normalised to sum to 1, and the
average is taken in float64 so that weights (1, 0) return the first model bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from thinkrl.config import ConfigError
from thinkrl.models import load_model, save_model
from thinkrl.trainer.common import need


@dataclass
class MergeConfig:
    models: list = field(default_factory=list)  # two or more model names or folders
    weights: list = field(default_factory=list)  # one per model; empty: equal weights
    output_dir: str = "runs/merge"

    def validate(self) -> None:
        need(len(self.models) >= 2, "merge needs models=[A,B,...] (two or more)")
        need(
            not self.weights or len(self.weights) == len(self.models),
            f"merge: {len(self.weights)} weights for {len(self.models)} models",
        )
        need(
            all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in self.weights),
            "merge: weights must be numbers >= 0",
        )
        need(not self.weights or sum(self.weights) > 0, "merge: the weights sum to 0")


def merge_state_dicts(states: list[dict], weights: list[float]) -> dict:
    """sum_i w_i * theta_i / sum_i w_i, key by key; every state must have the same keys and shapes."""
    total = float(sum(weights))
    keys = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if list(s) != keys or any(s[k].shape != states[0][k].shape for k in keys):
            raise ConfigError(
                f"merge: model {i + 1} does not have the architecture of model 1 (different "
                "parameter names or shapes)"
            )
    out = {}
    for k in keys:
        acc = sum(s[k].double() * (w / total) for s, w in zip(states, weights))
        out[k] = acc.to(states[0][k].dtype)
    return out


def run_merge(cfg: MergeConfig) -> Path:
    weights = [float(w) for w in cfg.weights] or [1.0] * len(cfg.models)
    first, tok = load_model(str(cfg.models[0]))
    states = [first.state_dict()] + [load_model(str(m))[0].state_dict() for m in cfg.models[1:]]
    first.load_state_dict(merge_state_dicts(states, weights))
    out = Path(cfg.output_dir) / "final"
    save_model(first, tok, out)
    return out
