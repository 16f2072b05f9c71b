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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from thinkrl.algorithms.preference import PREFERENCE_LOSSES
from thinkrl.config import TaskConfig
from thinkrl.data import IGNORE, encode_prompt_completion, read_rows
from thinkrl.models import load_model, save_model
from thinkrl.tasks import DataError
from thinkrl.trainer.batch import make_micro_batch, token_logps
from thinkrl.trainer.common import bucketed_steps, make_optimizer, need, optimizer_step
from thinkrl.trainer.logs import JsonlWriter

log = logging.getLogger(__name__)


@dataclass
class DPOConfig:
    model: str = "smollm2-135m"
    data: str = ""  # JSONL of prompt/chosen/rejected rows
    output_dir: str = "runs/dpo"
    loss: str = "dpo"  # dpo | ln_dpo | simpo
    beta: float = 0.1  # SimPO's paper uses 2.0-2.5 (its rewards are per-token averages)
    gamma: float = 0.5  # SimPO's target reward margin; unused by dpo and ln_dpo
    epochs: int = 1
    max_steps: int = 0  # 0: as many as the epochs take
    batch_size: int = 4  # pairs per step
    max_len: int = 512
    lr: float = 1e-6
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    seed: int = 0
    dtype: str = "auto"
    progress: bool = True
    task: TaskConfig = field(default_factory=TaskConfig)  # renders the prompts

    def validate(self) -> None:
        need(bool(self.data), "dpo needs data=PATH (a JSONL file of prompt/chosen/rejected rows)")
        PREFERENCE_LOSSES.check(self.loss)
        need(self.beta > 0, "beta must be > 0")
        need(self.epochs >= 1 and self.max_steps >= 0, "epochs must be >= 1 and max_steps >= 0")
        need(self.batch_size >= 1 and self.lr > 0, "batch_size must be >= 1 and lr > 0")
        need(self.dtype in ("auto", "bf16", "fp32"), f"dtype '{self.dtype}' unknown; choose from: auto, bf16, fp32")


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
    seq = logp.sum(-1)  # [2B]
    return seq[: len(pairs)], seq[len(pairs):]


@torch.no_grad()
def reference_logps(model, pairs: list[Pair], pad_id: int, bf16: bool, batch_size: int) -> torch.Tensor:
    model.eval()
    out = []
    for s in range(0, len(pairs), batch_size):
        c, r = sequence_logps(model, pairs[s: s + batch_size], pad_id, bf16)
        out.append(torch.stack([c, r], -1))  # [b, 2]
    return torch.cat(out)  # [N, 2]


def train_dpo(cfg: DPOConfig) -> Path:
    from thinkrl.device import use_bf16
    from thinkrl.trainer.rl import seed_everything

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    bf16 = use_bf16(cfg.dtype)
    rows = read_rows(cfg.data, need=("prompt", "chosen", "rejected"))
    model, tok = load_model(cfg.model)
    model.config.use_cache = False
    pairs = encode_pairs(rows, tok, cfg.task, cfg.max_len)
    loss_fn = PREFERENCE_LOSSES.get(cfg.loss)
    ref = reference_logps(model, pairs, tok.pad_token_id, bf16, cfg.batch_size) if loss_fn.needs_reference else None
    lengths = [len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in pairs]
    total = cfg.max_steps or -(-len(pairs) // cfg.batch_size) * cfg.epochs
    opt, sched = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.warmup_steps, total)
    metrics_log = JsonlWriter(out / "metrics.jsonl", truncate_after_step=0)
    model.train()
    for step, _, idx in bucketed_steps(lengths, cfg.batch_size, cfg.seed, total):
        batch = [pairs[i] for i in idx]
        logp_c, logp_r = sequence_logps(model, batch, tok.pad_token_id, bf16)  # [b], [b]
        len_c = torch.tensor([float(len(p.chosen)) for p in batch])  # [b]
        len_r = torch.tensor([float(len(p.rejected)) for p in batch])  # [b]
        ref_c, ref_r = (ref[idx, 0], ref[idx, 1]) if ref is not None else (None, None)
        loss, m = loss_fn(logp_c, logp_r, ref_c, ref_r, len_c, len_r, beta=cfg.beta, gamma=cfg.gamma)
        gn = optimizer_step(model, opt, sched, loss, cfg.max_grad_norm)
        metrics_log.write({"step": step, "loss": float(loss.detach()), **m, "grad_norm": gn,
                           "chosen_len": float(len_c.mean()), "rejected_len": float(len_r.mean())})
        if cfg.progress and (step % 10 == 0 or step == total):
            log.info("%s step %d/%d loss %.4f", cfg.loss, step, total, float(loss.detach()))
    final = out / "final"
    save_model(model, tok, final)
    return final
