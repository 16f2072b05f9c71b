"""The driver of ``distributed.backend=ray``: rollout workers on Ray, the learner in this process.

Kimi k1.5's split (section 2.6): rollout workers sample and score, a learner trains, and a
central loop moves prompts, samples and weights between them. One step, top to bottom:

    launch rollout iterations so that k = rollout.max_staleness of them run ahead
    collect the oldest iteration: finished groups join the batch, unfinished ones carry over
    learn on the batch (thinkrl.trainer.rl.learn: the single-process step's own code)
    push the new weights to every worker: version + checksum + timeout (WeightSyncError)

The learner is ``thinkrl.trainer.rl.Parts`` in the driver process, so advantages, losses,
the truncated-IS correction (``algo.tis_cap``), checkpoints and evals are the single-process
ones. The synchronous reference run is this same driver with an in-process pool
(:class:`LocalPool`): with ``max_staleness=0`` the Ray run equals it step for step
(tests/distributed/test_ray.py).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from pathlib import Path

from thinkrl.config import Config
from thinkrl.distributed.ray_engine import Seq
from thinkrl.distributed.ray_pool import LocalPool, RayPool
from thinkrl.distributed.ray_worker import GroupJob, state_checksum
from thinkrl.rollout import Rollout
from thinkrl.sampling import Groups
from thinkrl.trainer.guards import TrainingError

log = logging.getLogger(__name__)


class Counters:
    """The ids the next drawn group and sequence get. A sequence's id seeds its sampling, so a
    checkpoint keeps them (as the optional ``ray_counters`` component) and a resumed run
    samples what the uninterrupted one would have."""

    def __init__(self):
        self.seq = self.group = 0

    def state_dict(self) -> dict:
        return {"seq": self.seq, "group": self.group}

    def load_state_dict(self, state: dict) -> None:
        self.seq, self.group = state["seq"], state["group"]


class Driver:
    def __init__(self, cfg: Config, local: bool = False):
        from thinkrl.trainer.run import setup

        self.cfg, self.G = cfg, cfg.rollout.group_size
        self.ids = Counters()
        # the learner, restored from the last checkpoint with resume=true; its logs and checkpointer
        self.run = setup(cfg, extra_components={"ray_counters": self.ids})
        self.p, self.out = self.run.p, self.run.out
        # learner updates so far; the workers sample with the weights of this version
        self.version = self.run.start
        self.examples: dict[
            int, object
        ] = {}  # group uid -> the drawn example (the sampler tracks these objects)
        self.carry: list[GroupJob] = []  # unfinished groups, continued by the next iteration launched
        self.inflight: deque = deque()  # launched iterations, oldest first
        self.pool = LocalPool(cfg) if local else RayPool(cfg)
        try:
            self.sync()
        except BaseException:
            self.pool.close()
            raise

    # -- weights ---------------------------------------------------------------------------

    def sync(self) -> float:
        t0 = time.perf_counter()
        from thinkrl.trainer.common import merged_copy

        # with LoRA the workers get the merged weights: their engines hold a plain model. A
        # merge is already a copy of its own; the learner's own tensors are cloned, since the
        # next update changes them in place
        model = merged_copy(self.p.model)
        own = model is self.p.model
        state = {
            k: v.detach().cpu().clone() if own else v.detach().cpu() for k, v in model.state_dict().items()
        }
        self.pool.sync(state, self.version, state_checksum(state))
        return time.perf_counter() - t0

    # -- rollouts --------------------------------------------------------------------------

    def _fresh(self, n: int) -> list[GroupJob]:
        from thinkrl.tasks.templates import render_prompt

        jobs = []
        for ex in self.p.sampler.next_batch(n):
            rendered = render_prompt(ex.question, self.p.tok, self.cfg.task)
            ids = self.p.tok(rendered[0], add_special_tokens=False).input_ids
            seqs = [Seq(uid=self.ids.seq + k, prompt_ids=ids) for k in range(self.G)]
            self.ids.seq += self.G
            jobs.append(GroupJob(uid=self.ids.group, rendered=rendered, example=ex, seqs=seqs))
            self.examples[self.ids.group] = ex
            self.ids.group += 1
        return jobs

    def launch(self, groups: int | None = None) -> None:
        """Start one rollout iteration with the current weights: the carried-over groups plus
        fresh prompts up to ``groups`` (default ``rollout.prompts_per_step``) groups."""
        r = self.cfg.rollout
        want = r.prompts_per_step if groups is None else groups
        jobs = self.carry + self._fresh(max(0, want - len(self.carry)))
        self.carry = []
        budget = r.partial_tokens or r.max_new_tokens
        self.inflight.append(self.pool.submit(jobs, self.version, budget))

    def collect(self) -> tuple[list[GroupJob], int, dict]:
        """Wait for the oldest iteration; returns its finished groups, how many sequences were
        lost with a dead worker, and the workers' seconds. Unfinished groups carry over."""
        returned, lost, times = self.pool.wait(self.inflight.popleft())
        finished = []
        for j in returned:
            j.example = self.examples[j.uid]  # the driver's own object, not the worker's copy
            (finished if j.done else self.carry).append(j)
        for j in finished:
            del self.examples[j.uid]
        return finished, lost * self.G, times

    def batch(self, step: int) -> tuple[list[GroupJob], list[GroupJob], dict]:
        """The finished groups of step ``step``: ``(kept, seen, stats)``, the groups to train on
        and every group finished for this step. Up to k + 1 iterations stay in flight
        (k = rollout.max_staleness), each launched with the weights current at its launch; the
        oldest is collected until some group has finished.

        With DAPO dynamic sampling (``sampling.dynamic``) a group whose rewards are all equal is
        seen but not kept, and iterations are collected until ``rollout.prompts_per_step``
        groups are kept or ``sampling.max_rounds`` more iterations have returned finished
        groups. A refill iteration asks only for the groups still missing, as the
        single-process loop does (thinkrl/sampling/dynamic.py); iterations launched ahead are
        full, so with ``max_staleness`` >= 1 a step may keep more than ``prompts_per_step``."""
        cfg = self.cfg
        n, dynamic = cfg.rollout.prompts_per_step, cfg.sampling.dynamic
        ahead = max(
            1, min(cfg.rollout.max_staleness + 1, cfg.max_steps - step + 1)
        )  # no launches past the end
        t0 = time.perf_counter()
        kept, seen, dropped, iters, rounds = [], [], 0, 0, -1
        busy = {"generate_s": 0.0, "score_s": 0.0}
        while True:
            while len(self.inflight) < ahead:
                self.launch()
            got, lost, times = self.collect()
            seen += got
            kept += [j for j in got if varied(j)] if dynamic else got
            dropped += lost
            iters += 1
            rounds += bool(got)
            busy = {k: busy[k] + times[k] for k in busy}
            if not dynamic and kept:
                break
            if dynamic and (len(kept) >= n or rounds >= cfg.sampling.max_rounds):
                break
            if not seen and iters > cfg.rollout.partial_max_iters + ahead + 1:
                # cannot happen unless every group is lost
                raise TrainingError(
                    f"step {step}: {iters} rollout iterations returned no finished group "
                    f"({dropped} sequences lost with dead workers)"
                )
            if dynamic and seen and len(self.inflight) < ahead:
                self.launch(n - len(kept))  # the refill: only the groups still missing
        stats = {
            "dropped_seqs": dropped,
            "rollout_iters": iters,
            "carried_groups": len(self.carry),
            "rollout_workers": self.pool.alive(),
            "time_wait_rollout": time.perf_counter() - t0,
            # worker-seconds of the iterations collected for this step (the cost model's g)
            "worker_time_generate": busy["generate_s"],
            "worker_time_score": busy["score_s"],
        }
        if dynamic:
            stats.update(
                dynamic_rounds=max(0, rounds),
                dynamic_kept_groups=len(kept),
                dynamic_generated_groups=len(seen),
            )
        return sorted(kept, key=lambda j: j.uid), sorted(seen, key=lambda j: j.uid), stats

    # -- one step --------------------------------------------------------------------------

    def step(self, step: int) -> tuple[dict, list[dict]]:
        from thinkrl.trainer import rl

        jobs, seen_jobs, stats = self.batch(step)
        seen = to_groups(seen_jobs)
        dyn_stats = {k: stats.pop(k) for k in list(stats) if k.startswith("dynamic_")}
        self.p.sampler.update(seen.examples, seen.success())  # prioritized sampling tracks every group seen
        # generation and scoring ran in the workers; the driver's share of them is its wait
        timings = {"time_generate": stats["time_wait_rollout"], "time_score": 0.0}
        if not all(math.isfinite(r) for r in seen.totals):  # NaN advantages would poison the update
            metrics = rl._untrained(self.p, step, seen, dyn_stats, timings, skip_cause="nan_reward")
        elif not jobs:  # dynamic sampling hit its cap without one group that has a learning signal
            metrics = rl._untrained(self.p, step, seen, dyn_stats, timings)
        else:
            metrics = rl.learn(self.p, step, to_groups(jobs), seen, dyn_stats, timings)
        # one version per step, also for a step that trained nothing (its sync is then the same weights)
        self.version += 1
        stats["time_sync"] = self.sync()
        metrics["step_time"] += stats["time_sync"]
        g_s = stats["worker_time_generate"] + stats["worker_time_score"]
        t_train = metrics.get("time_train", 0.0)
        stats["worker_share"] = g_s / max(1e-9, g_s + t_train + stats["time_sync"])
        metrics.update(
            stats, **version_stats(jobs, learner_version=self.version - 1), policy_version=self.version
        )
        log.info(
            "step %d: reward %.3f, staleness %.2f, dropped %d, %.1f s",
            step,
            metrics["reward"],
            metrics["staleness_mean"],
            metrics["dropped_seqs"],
            metrics["step_time"],
        )
        return metrics, rl._samples(self.cfg, step, seen)

    def close(self) -> None:
        self.pool.close()


def to_groups(jobs: list[GroupJob]) -> Groups:
    """Scored groups in the single-process loop's layout (rows g*G .. g*G+G-1 for group g)."""
    seqs = [s for j in jobs for s in j.seqs]
    ro = Rollout(
        prompt_ids=[s.prompt_ids for s in seqs],
        completion_ids=[s.tokens for s in seqs],
        texts=[t[len(j.rendered[1]) :] for j in jobs for t in j.texts],
        truncated=[s.truncated for s in seqs],
        logps=[s.logps for s in seqs],
        loss_mask=None if jobs[0].loss_masks is None else [m for j in jobs for m in j.loss_masks],
        episodes=None if jobs[0].episodes is None else [e for j in jobs for e in j.episodes],
    )
    parts = {k: [v for j in jobs for v in j.parts[k]] for k in jobs[0].parts}
    return Groups(
        [j.example for j in jobs],
        [j.rendered for j in jobs],
        ro,
        [t for j in jobs for t in j.texts],
        [t for j in jobs for t in j.totals],
        parts,
    )


def varied(job: GroupJob) -> bool:
    """Whether a scored group's rewards differ (DAPO keeps only these: the others have zero advantage)."""
    return max(job.totals) != min(job.totals)


def version_stats(jobs: list[GroupJob], learner_version: int) -> dict:
    """Staleness (learner version minus the version that sampled a token) over the batch's
    tokens, the share of tokens by staleness, and how many iterations sequences spanned."""
    lags = [learner_version - v for j in jobs for s in j.seqs for v in s.versions]
    iters = [s.iters for j in jobs for s in j.seqs]
    n = max(1, len(lags))
    out = {
        "staleness_mean": sum(lags) / n,
        "staleness_max": max(lags, default=0),
        "seq_iters_mean": sum(iters) / max(1, len(iters)),
        "seq_iters_max": max(iters, default=0),
    }
    for d in sorted(set(lags)):
        out[f"token_share/lag{d}"] = lags.count(d) / n
    return out


def worker_pythonpath() -> str:
    """PYTHONPATH for Ray workers: this thinkrl's folder first, so that they import the same code."""
    import thinkrl

    root = str(Path(thinkrl.__file__).resolve().parent.parent)
    rest = os.environ.get("PYTHONPATH", "")
    return root + (os.pathsep + rest if rest else "")
