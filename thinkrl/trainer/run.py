"""The bookkeeping of an RL run around its steps (thinkrl/trainer/rl.py): setup (the resume
point, the parts, their restored state, the logs truncated to the resumed step), and the record
of each finished step (logs, trackers, the progress bar, the bad-step guard and the monitor)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from thinkrl.config import Config, save_config
from thinkrl.distributed import torch_dist as dist
from thinkrl.trainer import checkpoint as ckpt
from thinkrl.trainer.common import seed_everything
from thinkrl.trainer.guards import BadStepGuard
from thinkrl.trainer.interrupt import StopRequests
from thinkrl.trainer.logs import JsonlWriter, read_jsonl
from thinkrl.trainer.monitor import Monitor
from thinkrl.trainer.parts import Parts, build_parts, checkpointer
from thinkrl.trainer.tracking import Trackers


@dataclass
class Run:
    """An RL run in this process: its parts and the bookkeeping around its steps."""

    p: Parts
    out: Path
    guard: BadStepGuard
    checkpointer: ckpt.Checkpointer
    start: int  # the step the run resumed from; 0 for a fresh run
    logs: dict  # "metrics" and "samples" writers (rank 0's; the others write nothing)
    monitor: Monitor

    @property
    def main(self) -> bool:
        return dist.is_main()  # only rank 0 writes files (config, logs, evals, plots, checkpoints)


def setup(cfg: Config, extra_components: dict | None = None) -> Run:
    """After the process group is up: the resume point, the parts and their restored state, the
    logs. ``extra_components``: more objects with a state to checkpoint, each optional on
    resume (the Ray driver's sequence ids)."""
    out = Path(cfg.output_dir)
    with dist.main_first():  # rank 0 alone tidies the folder after a crash
        found = ckpt.resume_point(out, cfg.resume)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)

    p = build_parts(cfg, found[0] if found else None)
    main = dist.is_main()
    if main:  # after build_parts: a resume that cannot start leaves the run as it was
        save_config(cfg, out / "config.yaml")
    guard = BadStepGuard(cfg.optim.max_bad_steps)
    saver = checkpointer(p, guard, out)
    saver.components.update(extra_components or {})
    start = saver.restore(*found) if found else 0
    logs = {
        name: JsonlWriter(out / f"{name}.jsonl", truncate_after_step=start) if main else _NoWriter()
        for name in ("metrics", "samples")
    }
    # evals of steps being redone go; a fresh start also drops the "before" eval of a run that died early
    if main:
        JsonlWriter(out / "evals.jsonl", truncate_after_step=start if start else -1)
    dist.barrier()  # rank 0 has truncated the logs that a resumed run's monitor reads
    monitor = Monitor(cfg.monitor.gold, cfg.monitor.proxy, cfg.monitor.window)
    for m in read_jsonl(out / "metrics.jsonl") if monitor.active else []:  # a resumed run's history
        monitor.update(m)
    return Run(p, out, guard, saver, start, logs, monitor)


def record_step(run: Run, step: int, metrics: dict, samples: list, trackers: Trackers, bar) -> str | None:
    """Log a finished step; returns why the monitor would stop the run, or None. Raises when
    too many updates in a row were skipped, before anything more is saved: the last checkpoint
    stays the last good one."""
    run.guard.record(step, metrics)
    overoptimised = run.monitor.update(metrics)  # adds the slopes it watches to the metrics
    run.logs["metrics"].write(metrics)
    run.logs["samples"].write_many(samples)
    trackers.log(metrics, step)
    bar.update(1)
    bar.set_postfix(
        reward=f"{metrics['reward']:.3f}",
        acc=f"{metrics['accuracy']:.3f}",
        len=f"{metrics['response_len_mean']:.0f}",
        s=f"{metrics['step_time']:.1f}",
    )
    if run.guard.exhausted:
        raise run.guard.error(ckpt.latest_checkpoint(run.out))
    return overoptimised


def stop_requested(stop: StopRequests) -> bool:
    """Whether a signal asked this run to stop: on any rank, so that all ranks stop together."""
    return dist.any_true(stop.requested)


class _NoWriter:
    """The metrics and samples log of a rank other than 0, which writes no files."""

    def write(self, obj: dict) -> None:
        pass

    def write_many(self, objs: list) -> None:
        pass


def progress_bar(cfg: Config, start: int):
    from thinkrl import progress

    enabled = cfg.progress and dist.is_main()
    return progress.progress_bar(cfg.max_steps, "train", enabled=enabled, initial=start, tty_only=False)
