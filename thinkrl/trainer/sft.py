"""Supervised fine-tuning on chat data: the cold-start and rejection-sampling stages of
DeepSeek-R1 (DeepSeek-AI 2025, sections 2.3.1 and 2.3.3) and distillation into small
models by plain SFT on a teacher's traces (section 2.4).

The loss is the mean next-token cross-entropy over assistant (target) tokens only;
prompt tokens are context. With ``kd_teacher`` set (a model sharing the student's
vocabulary) the loss mixes in the token-level forward KL from the teacher's
next-token distribution (Hinton et al. 2015; Agarwal et al. 2024, "GKD").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from thinkrl import device
from thinkrl.config import ConfigError, validate_lora
from thinkrl.data import IGNORE, encode_sft_rows, read_rows
from thinkrl.distributed import torch_dist as dist
from thinkrl.models import load_model
from thinkrl.rollout import autocast
from thinkrl.trainer.batch import _backbone_and_head
from thinkrl.trainer.checkpoint import load_adapter
from thinkrl.trainer.common import (
    LoraConfig,
    apply_lora,
    collate,
    enable_gradient_checkpointing,
    make_optimizer,
    need,
    pack,
)
from thinkrl.trainer.supervised import SupervisedConfig, begin, run_steps

log = logging.getLogger(__name__)


@dataclass
class SFTConfig(SupervisedConfig):
    command: ClassVar[str] = "sft"
    data_help: ClassVar[str] = "a JSONL file of messages rows or prompt/completion rows"

    output_dir: str = "runs/sft"
    gradient_checkpointing: bool = (
        False  # recompute layer activations in backward: less memory, ~1/3 more time
    )
    packing: bool = (
        False  # a step's rows packed into sequences of <= max_len tokens (block-diagonal attention)
    )
    kd_teacher: str | None = None  # a model with the same vocabulary: adds token-level KL distillation
    kd_coef: float = 0.5  # loss = (1 - kd_coef) * CE + kd_coef * KL(teacher || student)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self) -> None:
        super().validate()
        need(self.max_len >= 2, "max_len must be >= 2")
        need(0 <= self.kd_coef <= 1, "kd_coef must be in [0, 1]")
        validate_lora(self.lora)


def sft_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Mean cross-entropy of next-token targets where ``labels != IGNORE``.

    logits [B, L, V] at every input position, labels [B, L] aligned with the input
    (position t's logits predict labels[t + 1]). Returns (loss, number of targets).
    """
    targets = labels[:, 1:]  # [B, L-1]
    keep = targets != IGNORE  # [B, L-1]
    n = int(keep.sum())
    if n == 0:
        return logits.sum() * 0.0, 0
    picked = logits[:, :-1][keep].float()  # [n, V]
    return F.cross_entropy(picked, targets[keep], reduction="mean"), n


def target_logits(model, batch: dict, bf16: bool) -> tuple[Tensor, Tensor]:
    """Logits only at the positions that predict a target: [n, V] and the targets [n].

    Running the LM head on target positions alone saves most of the vocabulary
    projection when prompts are long."""
    inner, head = _backbone_and_head(model)  # unwraps LoRA: its layers live inside the base model
    dev = head.weight.device
    batch = {k: device.to(v, dev) for k, v in batch.items()}  # the model's device: a no-op on the CPU
    with autocast(bf16, dev):
        hidden = inner(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch.get("position_ids"),
        ).last_hidden_state
        targets = batch["labels"][:, 1:]  # [B, L-1]
        keep = targets != IGNORE  # [B, L-1]
        logits = head(hidden[:, :-1][keep])  # [n, V]
    return logits.float(), targets[keep]


def kd_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean over positions of KL(p_teacher || p_student); both [n, V]."""
    t_logp = F.log_softmax(teacher_logits.float(), -1)  # [n, V]
    s_logp = F.log_softmax(student_logits.float(), -1)  # [n, V]
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()


def batch_loss(model, batch: dict, bf16: bool, teacher=None, kd_coef: float = 0.0) -> tuple[Tensor, dict]:
    logits, targets = target_logits(model, batch, bf16)  # [n, V], [n]
    ce = F.cross_entropy(logits, targets)
    metrics = {"ce": float(ce.detach()), "targets": int(targets.numel())}
    if teacher is None:
        return ce, metrics
    with torch.no_grad():
        t_logits, _ = target_logits(teacher, batch, bf16)  # [n, V]
    kl = kd_kl(logits, t_logits)
    metrics["kd_kl"] = float(kl.detach())
    return (1 - kd_coef) * ce + kd_coef * kl, metrics


def _same_vocab(tok_a, tok_b) -> bool:
    return len(tok_a) == len(tok_b) and tok_a.get_vocab() == tok_b.get_vocab()


def load_teacher(name: str, tok):
    teacher, t_tok = load_model(name)
    if not _same_vocab(tok, t_tok):
        raise ConfigError(
            f"kd_teacher {name} has a different vocabulary from the student; token-level KL "
            "needs the same tokenizer (distil by SFT on its traces instead)"
        )
    return teacher.eval().requires_grad_(False)


def train_sft(cfg: SFTConfig) -> Path:
    """Train and write an HF model folder to ``output_dir/final``; returns that path.
    Checkpoints and ``resume=true`` as in the RL loop (thinkrl/trainer/supervised.py)."""
    out = Path(cfg.output_dir)
    found, weights, dev, bf16 = begin(cfg, out)
    rows = read_rows(cfg.data)
    with dist.main_first():  # rank 0 builds a built-in model's cache folder, the others then load it
        model, tok = load_model(weights)
    model.to(dev)
    dist.broadcast_parameters(model)
    data = encode_sft_rows(rows, tok, cfg.task, cfg.max_len, source=cfg.data)
    teacher = load_teacher(cfg.kd_teacher, tok).to(dev) if cfg.kd_teacher else None
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model = apply_lora(model, cfg.lora)
    if found is not None and cfg.lora.enabled:
        load_adapter(model, found[0])
    dist.shard_policy(model)  # strategy=fsdp: FSDP2 shards it in place, before the optimizer
    lengths = [len(e.input_ids) for e in data]
    per_epoch = -(-len(data) // cfg.batch_size)
    total = cfg.max_steps or per_epoch * cfg.epochs
    opt, sched = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.warmup_steps, total)
    log.info("sft: %d rows, %d steps of %d rows", len(data), total, cfg.batch_size)

    def step_loss(idx: list[int]):
        rows_ = [data[i] for i in idx]
        batch = (
            pack(rows_, cfg.max_len, tok.pad_token_id) if cfg.packing else collate(rows_, tok.pad_token_id)
        )
        return batch_loss(model, batch, bf16, teacher, cfg.kd_coef)

    return run_steps(cfg, model, tok, opt, sched, lengths, total, step_loss, found=found, name="sft")
