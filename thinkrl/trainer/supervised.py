"""The step loop that SFT and DPO share: length-bucketed batches, guarded updates,
checkpoints, exact resumption and a clean stop on SIGINT/SIGTERM.

The two trainers differ only in how a batch of rows becomes a loss; everything around
that is here, with the same contract as the RL loop (thinkrl/trainer/rl.py):

- ``save_every`` steps a checkpoint ``checkpoints/step-N/`` (the keep-newest-
  ``keep_checkpoints`` rule applies), written aside and renamed into place;
- ``resume=true`` continues from the newest whole checkpoint: weights, optimizer, LR
  schedule, RNG, and the position in the (deterministic) batch order, so the resumed
  run's weights equal an uninterrupted run's;
- a non-finite loss or gradient norm skips the update; ``max_bad_steps`` in a row stop;
- a signal stops after the current step, which is saved under its own name;
- under torchrun (thinkrl/distributed/torch_dist.py) each rank takes a contiguous share of
  every batch's rows, the loss is weighted so that the summed gradients are the one-process
  gradient of the whole batch, and rank 0 alone writes files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from thinkrl.config import TaskConfig, check_dtype
from thinkrl.distributed import torch_dist as dist
from thinkrl.trainer import checkpoint as ckpt
from thinkrl.trainer.common import bucketed_steps, need, optimizer_step
from thinkrl.trainer.guards import BadStepGuard
from thinkrl.trainer.interrupt import Interrupted, StopRequests
from thinkrl.trainer.logs import JsonlWriter

log = logging.getLogger(__name__)

# batch row indices -> (loss, metrics); the loss is a mean over metrics["targets"] tokens when
# the metrics give that count, else over the rows
StepLoss = Callable[[list[int]], tuple[torch.Tensor, dict]]


@dataclass
class SupervisedConfig:
    """The keys every supervised trainer (sft, dpo, rm) has; each subclass adds its own and
    may change a default."""

    data_help: ClassVar[str] = "a JSONL file"  # what ``data=`` must be, for the error message
    command: ClassVar[str] = "train"

    model: str = "smollm2-135m"
    data: str = ""
    output_dir: str = "runs/supervised"
    epochs: int = 1
    max_steps: int = 0  # 0: as many as the epochs take
    batch_size: int = 8  # rows (pairs for dpo and rm) per step
    max_len: int = 512  # tokens per row; longer rows are cut
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    seed: int = 0
    dtype: str = "auto"  # auto | bf16 | fp32
    device: str = "auto"  # auto | cpu | cuda | cuda:N (thinkrl/device.py)
    strategy: str = "ddp"  # under torchrun: ddp (replicated) | fsdp (FSDP2-sharded; docs/distributed.md)
    progress: bool = True
    save_every: int = 100  # steps between checkpoints (0: none); the last step goes to final/
    keep_checkpoints: int = 2  # newest step checkpoints kept (0: all)
    resume: bool = False  # continue the run in output_dir from its newest whole checkpoint
    max_bad_steps: int = (
        3  # updates in a row skipped for a non-finite loss or gradient norm that stop the run
    )
    task: TaskConfig = field(default_factory=TaskConfig)  # renders the prompts

    def validate(self) -> None:
        need(bool(self.data), f"{self.command} needs data=PATH ({self.data_help})")
        need(self.epochs >= 1 and self.max_steps >= 0, "epochs must be >= 1 and max_steps >= 0")
        need(self.batch_size >= 1 and self.lr > 0, "batch_size must be >= 1 and lr > 0")
        check_dtype(self.dtype)
        validate_checkpointing(self)


def validate_checkpointing(cfg) -> None:
    """Checks of the keys every checkpointing trainer config has."""
    need(cfg.save_every >= 0, "save_every must be >= 0 (0: no step checkpoints)")
    need(cfg.keep_checkpoints >= 0, "keep_checkpoints must be >= 0 (0: keep them all)")
    need(cfg.max_bad_steps >= 1, "max_bad_steps must be >= 1 (skipped updates in a row that stop a run)")


def run_steps(
    cfg,
    model,
    tok,
    opt,
    sched,
    lengths: list[int],
    total: int,
    step_loss: StepLoss,
    found: tuple[Path, dict] | None = None,
    extra_state: dict | None = None,
    name: str = "sft",
) -> Path:
    """Train ``total`` steps (from ``found``'s step when resuming), then write ``final/``;
    returns its path. ``extra_state`` goes into every checkpoint's trainer state."""
    out = Path(cfg.output_dir)
    guard = BadStepGuard(cfg.max_bad_steps)
    saver = ckpt.Checkpointer(
        out,
        model,
        tok,
        {"optimizer": opt, "scheduler": sched, "guard": guard},
        required=("optimizer", "scheduler"),
        extra=extra_state,
        keep=cfg.keep_checkpoints,
    )
    start = saver.restore(*found) if found else 0
    main = dist.is_main()  # only rank 0 writes files
    step_loss = dist.through_root(model, step_loss)  # fsdp: each step's pass inside the FSDP root
    metrics_log = JsonlWriter(out / "metrics.jsonl", truncate_after_step=start) if main else None
    if dist.world_size() > 1:
        need(
            cfg.batch_size >= dist.world_size(),
            f"batch_size={cfg.batch_size} is smaller than the {dist.world_size()} processes: each needs rows",
        )

    model.train()
    step = start
    from thinkrl.progress import progress_bar

    bar = progress_bar(total, name, enabled=cfg.progress and main, initial=start, tty_only=False)
    with bar, StopRequests() as stop:
        for step, epoch, idx in bucketed_steps(lengths, cfg.batch_size, cfg.seed, total):
            if step <= start:
                continue  # the batch order is a pure function of the seed: skip what the checkpoint did
            metrics = {"step": step, "epoch": epoch, **_train_step(model, opt, sched, step_loss, idx, cfg)}
            guard.record(step, metrics)
            if main:
                metrics_log.write(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if guard.exhausted:
                raise guard.error(ckpt.latest_checkpoint(out))
            if step == total:
                break
            saver.after_step(step, cfg.save_every, stop)
        saver.save(step, "final")
    if dist.any_true(stop.requested):
        raise Interrupted(f"{stop.name} during the last step: final/ saved", stop.signum)
    return out / "final"


def _train_step(model, opt, sched, step_loss: StepLoss, idx: list[int], cfg) -> dict:
    """One optimizer step on the batch ``idx``; returns its metrics."""
    loss, m = _sharded_loss(step_loss, idx)
    gn, cause = optimizer_step(model, opt, sched, loss, cfg.max_grad_norm)
    return {
        "loss": float(loss.detach()),
        **m,
        "grad_norm": gn,
        "lr": sched.get_last_lr()[0],
        **({"skip_cause": cause} if cause else {}),
    }


def _sharded_loss(step_loss: StepLoss, idx: list[int]) -> tuple[torch.Tensor, dict]:
    """``step_loss`` of this rank's share of the batch ``idx``, weighted by its share of the
    batch's targets (or rows): the ranks' losses then sum to the loss of the whole batch.
    The metrics are the whole batch's, with its ``loss`` (which the returned tensor, this
    rank's share, is not). One process: ``step_loss(idx)`` as it is."""
    n = dist.world_size()
    if n == 1:
        return step_loss(idx)
    r = dist.rank()
    loss, m = step_loss(idx[r * len(idx) // n : (r + 1) * len(idx) // n])
    count = float(m.get("targets", (r + 1) * len(idx) // n - r * len(idx) // n))
    m = {**m, "loss": float(loss.detach())}
    tot = dist.reduce_dict({"count": count, **{k: float(v) * count for k, v in m.items() if k != "targets"}})
    out = {k: v / tot["count"] for k, v in tot.items() if k != "count"}
    if "targets" in m:
        out["targets"] = int(tot["count"])
    return loss * (count / tot["count"]), out


def start_weights(cfg, out: Path) -> tuple[tuple[Path, dict] | None, str]:
    """The checkpoint to resume from (or None) and where the weights to load come from:
    the checkpoint for full fine-tuning, the base model when a LoRA adapter goes on top."""
    with dist.main_first():  # rank 0 alone tidies the folder after a crash
        found = ckpt.resume_point(out, cfg.resume)
    lora = getattr(cfg, "lora", None) is not None and cfg.lora.enabled
    if found is not None and lora != ckpt.has_adapter(found[0]):
        raise ckpt.CheckpointError(
            f"{found[0]} was trained {'without' if lora else 'with'} LoRA: resume it with "
            f"lora.enabled={'false' if lora else 'true'} (and the same lora.* settings)"
        )
    return found, (str(found[0]) if found is not None and not lora else cfg.model)


def begin(cfg, out: Path) -> tuple[tuple[Path, dict] | None, str, str, bool]:
    """What ``sft`` and ``dpo`` do first: join the ranks (under torchrun, data-parallel:
    thinkrl/distributed/torch_dist.py), find the checkpoint to resume, seed, and choose the
    device and the dtype. Returns ``(found, weights, device, bf16)``; ``found`` and ``weights``
    as :func:`start_weights` returns them."""
    from thinkrl import device
    from thinkrl.trainer.common import seed_everything

    dist.init(cfg.strategy)
    found, weights = start_weights(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    dev = device.resolve_device(cfg.device)
    device.setup(dev)
    return found, weights, dev, device.use_bf16(cfg.dtype, dev)
