"""Pieces shared by the RL, SFT, DPO and sampling commands: config building, LoRA,
activation checkpointing, batch collation and the optimizer, on top of thinkrl.config's
schema helpers."""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import warnings
from pathlib import Path

import numpy as np
import torch

from thinkrl.config import ConfigError, LoraConfig
from thinkrl.data import IGNORE, length_buckets
from thinkrl.registry import Registry
from thinkrl.trainer.guards import skip_cause


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def apply_lora(
    model, lora: LoraConfig, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None
):
    """Wrap ``model`` with LoRA adapters (Hu et al. 2021) when enabled; otherwise return it.
    ``modules_to_save``: modules trained in full beside the adapters and saved with them (a
    reward model's new head)."""
    if not lora.enabled:
        return model
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in lora.target_modules if t not in names]
    need(not missing, f"lora.target_modules {missing} are not modules of this model")
    config = PeftLora(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type=task_type,
        modules_to_save=modules_to_save,
    )
    with warnings.catch_warnings():  # peft reads transformers' deprecated alias; nothing for a user to change
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def is_lora(model) -> bool:
    """True for a model wrapped by :func:`apply_lora` (a ``peft.PeftModel``)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def unwrap_lora(model):
    """Fold LoRA weights into the base model, so the saved folder is a plain HF model.
    In place: ``model`` is unusable as a LoRA model afterwards (see :func:`merged_copy`)."""
    return model.merge_and_unload() if is_lora(model) else model


def merged_copy(model):
    """A plain HF model with the LoRA weights folded in, leaving ``model`` and its adapter
    untouched (merging in place and unmerging would round the base weights: W + D - D != W
    in floating point, and the base is also the KL reference). Costs one copy of the weights
    while it lives; a model without LoRA is returned as is."""
    return copy.deepcopy(model).merge_and_unload() if is_lora(model) else model


def enable_gradient_checkpointing(model) -> None:
    """Activation checkpointing on every decoder layer, non-reentrant (which needs no input
    that requires grad, so it also works when only LoRA weights train). Call it on the HF
    model before :func:`apply_lora`."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def collate(encoded: list, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row; padding is never a target."""
    width = max(len(e.input_ids) for e in encoded)
    ids = [e.input_ids + [pad_id] * (width - len(e.input_ids)) for e in encoded]
    labels = [e.labels + [IGNORE] * (width - len(e.labels)) for e in encoded]
    attn = [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in encoded]
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),  # [B, L]
        "attention_mask": torch.tensor(attn),
    }  # [B, L]


def pack(encoded: list, max_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Pack rows end to end into as few sequences of at most ``max_len`` tokens as the
    first-fit-decreasing rule finds, instead of padding each to the longest.

    Each row sees only itself: ``attention_mask`` is a 4-D additive mask [S, 1, W, W],
    block-diagonal and causal, and ``position_ids`` restart at 0 for each row, so the loss
    and gradients equal those of the padded batch (tested). A row's first token is never a
    target (it has no predecessor in its own row)."""
    bins: list[list] = []
    used: list[int] = []  # tokens already in each bin
    for e in sorted(encoded, key=lambda e: -len(e.input_ids)):
        n = len(e.input_ids)
        i = next((i for i, u in enumerate(used) if u + n <= max_len), len(bins))
        if i == len(bins):
            bins.append([])
            used.append(0)
        bins[i].append(e)
        used[i] += n
    width = max(used)
    ids = torch.full((len(bins), width), pad_id)
    labels = torch.full((len(bins), width), IGNORE)
    pos = torch.zeros(len(bins), width, dtype=torch.long)
    seg = torch.full((len(bins), width), -1)  # which row of the bin a slot holds; -1: padding
    for i, b in enumerate(bins):
        at = 0
        for j, e in enumerate(b):
            n = len(e.input_ids)
            ids[i, at : at + n] = torch.tensor(e.input_ids)
            labels[i, at : at + n] = torch.tensor(e.labels)
            labels[i, at] = IGNORE
            pos[i, at : at + n] = torch.arange(n)
            seg[i, at : at + n] = j
            at += n
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    # Padding slots attend to themselves only (a fully masked row would give NaN).
    visible = (causal & (seg[:, :, None] == seg[:, None, :])) | torch.eye(width, dtype=torch.bool)
    mask = torch.zeros(visible.shape).masked_fill_(~visible, torch.finfo(torch.float32).min)
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": mask[:, None]}


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (every trainer, before it builds anything)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


SCHEDULES: Registry = Registry("learning-rate schedule")  # fn(frac, min_ratio) -> multiplier after warm-up


@SCHEDULES.register("constant")
def _constant(frac: float, min_ratio: float) -> float:
    return 1.0


@SCHEDULES.register("linear")
def _linear(frac: float, min_ratio: float) -> float:
    return 1.0 - (1.0 - min_ratio) * frac


@SCHEDULES.register("cosine")
def _cosine(frac: float, min_ratio: float) -> float:
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))


def lr_schedule(warmup_steps: int, total_steps: int, schedule: str = "cosine", min_ratio: float = 0.1):
    """LR multiplier per optimizer step: linear warm-up, then one of :data:`SCHEDULES`
    (constant, linear or cosine decay to ``min_ratio`` at ``total_steps``). Shared by the RL,
    SFT and DPO trainers."""
    decay = SCHEDULES.get(schedule)

    def f(i: int) -> float:
        if warmup_steps and i < warmup_steps:
            return (i + 1) / warmup_steps
        return decay(min(1.0, (i - warmup_steps) / max(1, total_steps - warmup_steps)), min_ratio)

    return f


def adamw(params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) over ``params``, fused: one kernel pass per tensor
    instead of one per operation. Every trainer's optimizer (policy, critic, SFT, DPO, RM)."""
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=True)


def make_optimizer(model, lr: float, weight_decay: float, warmup_steps: int, total_steps: int):
    """AdamW over the trainable parameters, with linear warmup then cosine decay to 10% of ``lr``."""
    opt = adamw([p for p in model.parameters() if p.requires_grad], lr, weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(warmup_steps, total_steps))


def bucketed_steps(lengths: list[int], batch_size: int, seed: int, total: int):
    """Yield ``(step, epoch, rows)`` for ``total`` optimizer steps over length-bucketed
    batches, reshuffled each epoch; ``step`` counts from 1."""
    step, epoch = 0, 0
    while step < total:
        for rows in length_buckets(lengths, batch_size, seed=seed * 1000 + epoch):
            if step >= total:
                return
            step += 1
            yield step, epoch, rows
        epoch += 1


def optimizer_pass(
    model, opt, parts, loss_of, max_grad_norm: float, *, sched=None, before_step=None
) -> tuple[float, float, str | None]:
    """One optimizer step over the micro-batches ``parts``: the one backward loop of every trainer.

    ``loss_of(part)`` returns ``(loss, value)``: the part's share of the step's loss (a tensor to
    backpropagate) and the float to add to the step's loss. The gradients (and the summed value)
    are then summed over the ranks, clipped to ``max_grad_norm`` and applied, with ``before_step()``
    called just before the update and ``sched`` stepped after it. A non-finite loss or gradient
    norm applies nothing (thinkrl/trainer/guards.py); a non-finite loss on one rank makes the
    summed loss non-finite, so all ranks skip together. Returns the step's loss (over every rank),
    the pre-clip gradient norm and why the update was skipped, or None when it was applied."""
    from thinkrl.distributed import torch_dist as dist

    opt.zero_grad(set_to_none=True)
    total = 0.0
    for part in dist.even_passes(model, parts):  # fsdp: every rank runs as many passes
        loss, value = loss_of(part)
        loss.backward()
        total += value
    (total,) = dist.sum_gradients(model.parameters(), total)  # one process: nothing happens
    gn = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))
    cause = skip_cause(total, gn)
    if cause is not None:
        opt.zero_grad(set_to_none=True)
        return total, gn, cause
    if before_step is not None:
        before_step()
    opt.step()
    if sched is not None:
        sched.step()
    return total, gn, None


def optimizer_step(model, opt, sched, loss: torch.Tensor, max_grad_norm: float) -> tuple[float, str | None]:
    """Backward, clip, step the optimizer and the schedule on one loss (each rank's loss is its
    weighted share, thinkrl/trainer/supervised.py); returns the pre-clip grad norm and why the
    update was skipped, or None (see :func:`optimizer_pass`)."""
    _, gn, cause = optimizer_pass(
        model, opt, [loss], lambda x: (x, float(x.detach())), max_grad_norm, sched=sched
    )
    return gn, cause


def finished(out: Path) -> bool:
    return (Path(out) / "config.json").is_file()
