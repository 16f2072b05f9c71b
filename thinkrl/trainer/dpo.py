"""Preference optimisation on (prompt, chosen, rejected) rows: DPO (Rafailov et al. 2023),
length-normalised DPO and SimPO (Meng et al. 2024), the losses in
``thinkrl.algorithms.preference``.

For long2short (Kimi Team 2025, "Kimi k1.5", section 2.4) the pairs come from
``thinkrl sample mode=pairs``: the shortest correct response is chosen, a wrong or
longer one rejected.

The reference is the starting policy, so its log-probs are computed once, before
the first update, by the same model: no second copy is held in memory. SimPO
computes none.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from thinkrl import device
from thinkrl.algorithms.preference import PREFERENCE_LOSSES
from thinkrl.data import IGNORE, encode_prompt_completion, read_rows
from thinkrl.distributed import torch_dist as dist
from thinkrl.models import load_model
from thinkrl.tasks import DataError
from thinkrl.trainer.batch import make_micro_batch, token_logps
from thinkrl.trainer.common import make_optimizer, need
from thinkrl.trainer.supervised import SupervisedConfig, begin, run_steps

log = logging.getLogger(__name__)


@dataclass
class DPOConfig(SupervisedConfig):
    command: ClassVar[str] = "dpo"
    data_help: ClassVar[str] = "a JSONL file of prompt/chosen/rejected rows"

    output_dir: str = "runs/dpo"
    loss: str = "dpo"  # dpo | ln_dpo | simpo
    beta: float = 0.1  # SimPO's paper uses 2.0-2.5 (its rewards are per-token averages)
    gamma: float = 0.5  # SimPO's target reward margin; unused by dpo and ln_dpo
    batch_size: int = 4  # pairs per step
    lr: float = 1e-6

    def validate(self) -> None:
        super().validate()
        PREFERENCE_LOSSES.check(self.loss)
        need(self.beta > 0, "beta must be > 0")


@dataclass
class Pair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def _split(enc) -> tuple[list[int], list[int]]:
    cut = next(i for i, t in enumerate(enc.labels) if t != IGNORE)
    return enc.input_ids[:cut], enc.input_ids[cut:]


def encode_pairs(rows: list[dict], tok, task_cfg, max_len: int) -> list[Pair]:
    pairs = []
    for row in rows:
        p, c = _split(encode_prompt_completion(str(row["prompt"]), str(row["chosen"]), tok, task_cfg))
        _, r = _split(encode_prompt_completion(str(row["prompt"]), str(row["rejected"]), tok, task_cfg))
        room = max_len - len(p)
        if room >= 1:
            pairs.append(Pair(p, c[:room], r[:room]))
    if not pairs:
        raise DataError(f"no preference pair leaves room for a response within max_len={max_len}")
    return pairs


def sequence_logps(model, pairs: list[Pair], pad_id: int, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of chosen and rejected: two [B] tensors, one forward pass."""
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    mb = make_micro_batch(prompts, responses, list(range(len(prompts))), pad_id)
    logp, _ = token_logps(model, mb, bf16=bf16)  # [2B, T], zero on padding
    seq = device.to(logp.sum(-1), "cpu")  # [2B], with the lengths and reference log-probs (differentiable)
    return seq[: len(pairs)], seq[len(pairs) :]


@torch.no_grad()
def reference_logps(model, pairs: list[Pair], pad_id: int, bf16: bool, batch_size: int) -> torch.Tensor:
    model.eval()
    out = []
    for s in range(0, len(pairs), batch_size):
        c, r = sequence_logps(model, pairs[s : s + batch_size], pad_id, bf16)
        out.append(torch.stack([c, r], -1))  # [b, 2]
    return torch.cat(out)  # [N, 2]


def train_dpo(cfg: DPOConfig) -> Path:
    """Train and write ``output_dir/final``; returns its path. Checkpoints and ``resume=true``
    as in the RL loop (thinkrl/trainer/supervised.py). The reference log-probs, computed once
    from the starting model, travel in every checkpoint, so a resumed run uses the same ones."""
    out = Path(cfg.output_dir)
    found, weights, dev, bf16 = begin(cfg, out)
    rows = read_rows(cfg.data, need=("prompt", "chosen", "rejected"))
    with dist.main_first():  # rank 0 builds a built-in model's cache folder, the others then load it
        model, tok = load_model(weights)
    model.to(dev)
    dist.broadcast_parameters(model)
    model.config.use_cache = False
    pairs = encode_pairs(rows, tok, cfg.task, cfg.max_len)
    loss_fn = PREFERENCE_LOSSES.get(cfg.loss)
    ref = None
    if loss_fn.needs_reference:
        ref = (
            found[1].get("ref")
            if found
            else reference_logps(model, pairs, tok.pad_token_id, bf16, cfg.batch_size)
        )
        need(
            ref is not None and len(ref) == len(pairs),
            f"{found and found[0]} was written by another loss or "
            "other data: resume it with the run's own loss and data",
        )
    dist.shard_policy(model)  # strategy=fsdp: after the reference pass, before the optimizer
    lengths = [len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in pairs]
    total = cfg.max_steps or -(-len(pairs) // cfg.batch_size) * cfg.epochs
    opt, sched = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.warmup_steps, total)

    def step_loss(idx: list[int]):
        batch = [pairs[i] for i in idx]
        logp_c, logp_r = sequence_logps(model, batch, tok.pad_token_id, bf16)  # [b], [b]
        len_c = torch.tensor([float(len(p.chosen)) for p in batch])  # [b]
        len_r = torch.tensor([float(len(p.rejected)) for p in batch])  # [b]
        ref_c, ref_r = (ref[idx, 0], ref[idx, 1]) if ref is not None else (None, None)
        loss, m = loss_fn(logp_c, logp_r, ref_c, ref_r, len_c, len_r, beta=cfg.beta, gamma=cfg.gamma)
        return loss, {**m, "chosen_len": float(len_c.mean()), "rejected_len": float(len_r.mean())}

    return run_steps(
        cfg,
        model,
        tok,
        opt,
        sched,
        lengths,
        total,
        step_loss,
        found=found,
        extra_state={"ref": ref},
        name=cfg.loss,
    )
