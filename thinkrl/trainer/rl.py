"""The RL loop: sample, score, compute advantages, update. One step reads top to bottom.

    prompts -> rollout engine -> completions -> rewards -> advantages
      -> policy loss (+ KL, entropy) -> optimizer step (+ critic step) -> logs, checkpoints

Every algorithm is the same loop with different registered parts (``algo.advantage``,
``algo.loss``, ``algo.kl_estimator`` placed by ``algo.kl_in``, ``algo.loss_agg``):
GRPO, Dr. GRPO, RLOO, REINFORCE, REINFORCE++(-baseline), Kimi's mirror descent, and
PPO, whose critic lives in :mod:`thinkrl.trainer.critic`.

A run splits as torchtune's recipes split theirs: setup (thinkrl/trainer/run.py; the parts are
built in thinkrl/trainer/parts.py), :func:`rl_step` (one step; the policy update is
thinkrl/trainer/update.py, its loss thinkrl/algorithms/objective.py), checkpoints (a
:class:`~thinkrl.trainer.checkpoint.Checkpointer` owns the trainer state) and :func:`_run_eval`.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from thinkrl.algorithms import (
    ADVANTAGES,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    AdvantageInput,
    kl_in_for,
    uses_batch_statistics,
)
from thinkrl.config import Config
from thinkrl.distributed import torch_dist as dist
from thinkrl.envs.episodes import evaluate_episodes, generate_and_score_episodes, tool_metrics
from thinkrl.eval import eval_settings, evaluate, write_json
from thinkrl.eval.metrics import reflection_stats
from thinkrl.rollout import SamplingParams
from thinkrl.rollout.scoring import completion_stats, mode_stats, sample_and_score
from thinkrl.sampling import Groups
from thinkrl.trainer import update
from thinkrl.trainer.batch import logps_of, policy_token_mask, split_grouped_micro_batches
from thinkrl.trainer.interrupt import Interrupted, StopRequests, failpoint
from thinkrl.trainer.logs import JsonlWriter, plot_metrics, read_jsonl
from thinkrl.trainer.parts import Parts
from thinkrl.trainer.parts import Reference as Reference  # imported from here by tests
from thinkrl.trainer.parts import build_parts as build_parts
from thinkrl.trainer.parts import load_policy as load_policy
from thinkrl.trainer.parts import lr_lambda as lr_lambda
from thinkrl.trainer.run import Run, progress_bar, record_step, setup, stop_requested
from thinkrl.trainer.tracking import Trackers

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# One step


def rl_step(p: Parts, step: int) -> tuple[dict, list[dict]]:
    cfg = p.cfg
    failpoint("generate", step)

    # 1-2. Sample G completions for each prompt and score them. With DAPO dynamic sampling,
    # groups whose rewards are all equal are dropped and refilled (thinkrl/sampling/dynamic.py).
    timings = {"time_generate": 0.0, "time_score": 0.0}
    # With many ranks, kept is this rank's share and seen every rank's groups (for metrics and
    # the sampler): thinkrl/distributed/torch_dist.py
    kept, seen, dyn_stats = dist.collect_groups(
        p.sampler.next_batch,
        lambda exs, seeds: generate_and_score(p, exs, timings, seeds),
        cfg.rollout.prompts_per_step,
        dynamic=cfg.sampling.dynamic,
        max_rounds=cfg.sampling.max_rounds,
        seeds=_group_seeds(cfg, step),
    )
    samples = _samples(cfg, step, seen)
    if not all(math.isfinite(r) for r in seen.totals):  # a NaN reward would make its group's advantages NaN
        return _untrained(p, step, seen, dyn_stats, timings, skip_cause="nan_reward"), samples
    p.sampler.update(seen.examples, seen.success())  # prioritized sampling tracks every group it saw
    if not len(kept):  # dynamic sampling hit its cap without one group that has a learning signal
        return _untrained(p, step, seen, dyn_stats, timings), samples
    return learn(p, step, kept, seen, dyn_stats, timings), samples


def learn(p: Parts, step: int, kept: Groups, seen: Groups, dyn_stats: dict, timings: dict) -> dict:
    """Steps 3-4 of a step on scored groups: advantages, the policy (and critic) update, and
    the step's metrics. Shared with the Ray driver (thinkrl/distributed/ray_driver.py), whose
    groups come from rollout workers."""
    cfg, a = p.cfg, p.cfg.algo
    ro = kept.ro

    # 3. Advantages: per token, from the rewards and whatever the estimator reads.
    t0 = time.perf_counter()
    N = len(ro.completion_ids)
    T = max(len(c) for c in ro.completion_ids)
    lengths = torch.tensor([len(c) for c in ro.completion_ids])  # [N]
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float() * policy_token_mask(ro, T)  # [N, T]
    rewards = torch.tensor(kept.totals, dtype=torch.float32)  # [N]
    mbs = split_grouped_micro_batches(
        ro.prompt_ids,
        ro.completion_ids,
        list(range(len(kept.examples))),
        cfg.rollout.group_size,
        cfg.optim.micro_batch_size,
        p.tok.pad_token_id,
    )
    fixed = advantage_inputs(p, mbs, N, T)  # old_logp/ref_logp (KL in the reward), values (critic)
    token_kl = None
    if "ref_logp" in fixed:
        token_kl = KL_ESTIMATORS.get(a.kl_estimator)(fixed["old_logp"], fixed["ref_logp"]) * mask  # [N, T]
    est = _advantages(p, rewards, mask, len(kept.examples), token_kl, fixed.get("values"))

    # 4. Update the policy (and the critic).
    train_metrics = policy_update(p, ro, est.adv, mask, fixed, step=step)
    p.engine.sync_weights(dist.full_model(p.model))  # the next rollouts sample from the updated policy
    skipped = "skip_cause" in train_metrics  # the policy was not updated: neither are the critic and baseline
    if token_kl is not None:
        kl_sum, n_tok = dist.sum_floats([float(token_kl.sum()), float(mask.sum())])
        train_metrics["kl"] = kl_sum / n_tok
    if p.critic is not None and not skipped:
        train_metrics.update(p.critic.update(mbs, est.returns, fixed["values"], a.num_iterations))
    if p.baseline is not None:
        train_metrics["baseline"] = p.baseline.value
        if not skipped:
            r_sum, r_n = dist.sum_floats([float(rewards.sum()), float(N)])
            p.baseline.update(r_sum / r_n)
    timings["time_train"] = time.perf_counter() - t0
    return _step_metrics(p, step, seen, dyn_stats, train_metrics, timings)


def _advantages(p: Parts, rewards, mask, n_groups: int, token_kl, values):
    """The estimator's advantages (and returns) of a step: rewards [N], mask [N, T]."""
    a = p.cfg.algo
    return dist.advantages(
        ADVANTAGES.get(a.advantage),
        AdvantageInput(
            rewards,
            torch.arange(n_groups).repeat_interleave(p.cfg.rollout.group_size),  # [N] group ids
            mask,
            token_kl=token_kl,
            kl_coef=a.kl_coef,
            values=values,
            baseline=p.baseline.value if p.baseline else 0.0,
            gamma=a.gamma,
            lam=a.lam,
            eps=a.std_eps,
        ),
        whole_batch=uses_batch_statistics(a.advantage),
    )


def _step_metrics(
    p: Parts, step: int, seen: Groups, dyn_stats: dict, train_metrics: dict, timings: dict
) -> dict:
    metrics = {
        "step": step,
        # reward, accuracy, lengths and reflection over every group generated this step (with dynamic
        # sampling, also the dropped ones: the kept ones alone would overstate a mixed success rate)
        **_sample_metrics(p.cfg, seen),
        **tool_metrics(seen.ro),
        **dyn_stats,
        **train_metrics,
        **timings,
        "step_time": sum(timings.values()),
        "tokens_per_s": sum(map(len, seen.ro.completion_ids)) / max(timings["time_generate"], 1e-9),
        "lr": p.scheduler.get_last_lr()[0],
    }
    for k, v in p.rewards.failures.items():
        metrics[f"reward_failures/{k}"] = v
    return metrics


def _group_seeds(cfg: Config, step: int):
    """How this step's rollouts are seeded: per-group seeds by the group's index in the step's
    global order (``distributed.seed_by_group``: one engine call per group); one seed for the step's
    batched call, from the step and the rank, when there are several ranks (each rank then
    samples its own stream, also after a resume, which restores rank 0's RNG); or None in
    one process: one batched call on the process's RNG, as always."""
    if cfg.distributed.seed_by_group:
        return dist.GroupSeeds(cfg.seed, step)
    if dist.world_size() > 1:
        return dist.group_seed(cfg.seed, step, -1 - dist.rank())
    return None


def _untrained(p: Parts, step: int, seen: Groups, dyn_stats: dict, timings: dict, **extra) -> dict:
    """The metrics of a step that updated nothing."""
    return {
        "step": step,
        **_sample_metrics(p.cfg, seen),
        **dyn_stats,
        "trained_seqs": 0,
        **timings,
        "step_time": sum(timings.values()),
        "lr": p.scheduler.get_last_lr()[0],
        **extra,
    }


def generate_and_score(p: Parts, examples: list, timings: dict, seeds=None) -> Groups:
    """G completions for each prompt, and their rewards; adds to ``timings``. ``seeds``: an
    iterator of per-group sampling seeds (``distributed.seed_by_group``), one engine call each,
    or one seed for the step's one call (see ``_group_seeds``)."""
    cfg, r = p.cfg, p.cfg.rollout
    if p.env is not None and p.env.multi_turn:  # turns and observations (thinkrl/envs/episodes.py)
        return generate_and_score_episodes(
            p.engine, p.tok, p.env, p.rewards, cfg, examples, timings, seeds=seeds
        )
    one_seed = seeds is None or isinstance(seeds, int)
    params = SamplingParams(
        max_new_tokens=r.max_new_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        seed=seeds if isinstance(seeds, int) else None,
    )
    return sample_and_score(
        p.engine,
        p.tok,
        examples,
        cfg.task,
        r.group_size,
        params,
        p.rewards,
        group_seeds=None if one_seed else seeds,
        timings=timings,
    )


def _sample_metrics(cfg: Config, g: Groups) -> dict:
    N = len(g.totals)
    rewards = torch.tensor(g.totals, dtype=torch.float32)  # [N]
    return {
        "reward": float(rewards.mean()),
        "reward_std": float(rewards.std()) if N > 1 else 0.0,
        **{f"reward/{k}": sum(v) / N for k, v in g.parts.items()},
        **completion_stats(g),
        "zero_std_groups": 1.0 - len(g.varied()) / len(g),
        **reflection_stats(g.texts, cfg.eval.reflection_words),
        "generated_seqs": N,
        # accuracy, form and length per thinking mode (task.thinking): accuracy/on, ...
        **{f"{k}/{mode}": v for mode, m in mode_stats(g).items() for k, v in m.items() if k != "n"},
    }


def _samples(cfg: Config, step: int, g: Groups) -> list[dict]:
    N, G = len(g.totals), cfg.rollout.group_size
    return [
        {
            "step": step,
            "prompt": g.rendered[i // G][0],
            "completion": g.texts[i],
            "answer": g.examples[i // G].answer,
            "reward": g.totals[i],
            **{k: v[i] for k, v in g.parts.items()},
            **({"episode": g.ro.episodes[i]} if g.ro.episodes else {}),
        }
        for i in range(0, N, max(1, N // max(1, cfg.log_samples)))
    ][: cfg.log_samples]


def advantage_inputs(p: Parts, mbs, N: int, T: int) -> dict:
    """Per-token tensors [N, T] that the estimator needs before any update: the sampling
    policy's and the reference's log-probs when the KL goes in the reward, the critic's values."""
    out = {}
    if p.ref is not None and kl_in_for(p.cfg.algo.advantage, p.cfg.algo.kl_in) == "reward":
        temp = p.cfg.rollout.temperature
        out["old_logp"] = logps_of(p.model, mbs, N, T, temperature=temp, bf16=p.bf16)
        out["ref_logp"] = p.ref.logps(mbs, N, T, temperature=temp, bf16=p.bf16)
    if p.critic is not None:
        out["values"] = p.critic.values(mbs, N, T)
    return out


def policy_update(
    p: Parts, ro, adv: torch.Tensor, mask: torch.Tensor, fixed: dict | None = None, step: int = 0
) -> dict:
    """``num_iterations`` passes over one batch of rollouts (PPO-style reuse), each split into
    ``algo.mini_batches`` optimizer steps over whole groups (thinkrl/trainer/update.py), with the
    configured objective (thinkrl/algorithms/objective.py).

    ``fixed`` may hold ``old_logp`` [N, T] already computed for the advantages. A pass whose
    loss or gradient norm is not finite is not applied, and ends the update: the result then
    has ``skip_cause`` (thinkrl/trainer/guards.py); passes before it stay applied."""
    a = p.cfg.algo
    kl_in_loss = p.ref is not None and kl_in_for(a.advantage, a.kl_in) == "loss"
    objective = update.objective_for(p.cfg, POLICY_LOSSES.get(a.loss), kl_in_loss)
    return update.policy_update(
        p, ro, adv, mask, objective, fixed, before_step=lambda: failpoint("train", step)
    )


def _run_eval(p: Parts, step: int, label: str, out: Path) -> dict:
    """Held-out evaluation with every ``eval.*`` setting, as ``thinkrl eval`` runs it."""
    cfg = p.cfg
    rollout_batch = p.engine.batch_size
    p.engine.batch_size = cfg.eval.batch_size
    try:
        if p.env is not None:  # a multi-turn run is measured in its environment (with its tool)
            res = evaluate_episodes(
                p.engine, p.tok, p.env, p.task.eval[: cfg.eval.n], cfg, **eval_settings(cfg)
            )
        else:
            res = evaluate(p.engine, p.tok, p.task.eval[: cfg.eval.n], cfg.task, **eval_settings(cfg))
    finally:
        p.engine.batch_size = rollout_batch
    summary = {"step": step, "label": label, **res["summary"]}
    write_json(out / f"eval_{label}.json", {"summary": summary, "records": res["records"]})
    JsonlWriter(out / "evals.jsonl").write(summary)
    log.info(
        "held-out %s: accuracy %.3f, format %.3f (n=%d)",
        label,
        summary["accuracy"],
        summary["format_rate"],
        summary["n"],
    )
    return summary


# ---------------------------------------------------------------------------
# The run: setup, steps, checkpoints, evaluation


def train(cfg: Config) -> dict:
    """Run (or resume) RL training as configured; returns the held-out results.

    Crash safety (docs/checkpoints.md): a ``kill -9`` loses at most
    the steps since the last checkpoint, and a resumed run continues exactly. SIGINT and
    SIGTERM stop after the current step and save it (thinkrl/trainer/interrupt.py)."""
    ray = cfg.distributed.backend == "ray"
    if ray:  # rollout workers on Ray, the learner here: the same loop (docs/distributed-ray.md)
        from thinkrl.distributed.ray_driver import Driver

        driver = Driver(cfg)
        run, step_fn, release = driver.run, driver.step, driver.close
    else:
        dist.init(cfg.distributed.strategy)
        _check_distributed(cfg)
        run = setup(cfg)
        step_fn, release = (lambda step: rl_step(run.p, step)), (lambda: None)
    try:
        return _run(run, step_fn, release, " on Ray" if ray else "")
    finally:
        release()  # _run has released them already, unless it failed before that


def _run(run: Run, step_fn, release, where: str) -> dict:
    """The run after setup, in one process or with Ray rollout workers: the steps
    (``step_fn(step) -> (metrics, samples)``) with their logs, trackers, checkpoints, signals,
    ``max_minutes`` and the monitor; the final checkpoint; then ``release()`` (the rollout
    workers, before the held-out eval, which runs on the learner's engine)."""
    cfg = run.p.cfg
    results: dict = {}
    if cfg.eval.before and run.start == 0 and run.main:
        results["before"] = _run_eval(run.p, 0, "before", run.out)
    trackers = Trackers(
        cfg.log.backends if run.main else ["jsonl"], run.out, cfg.log.project, cfg.to_dict(), run.out.name
    )
    t_start = time.monotonic()  # max_minutes counts the training loop of this process
    try:
        with StopRequests() as stop:
            step = _train_loop(run, stop, t_start, trackers, step_fn)
            results["train_minutes"] = (time.monotonic() - t_start) / 60
            log.info("training loop: steps %d-%d in %.2f min", run.start + 1, step, results["train_minutes"])
            run.checkpointer.save(step, "final")  # step < max_steps when max_minutes stopped the run
    finally:
        trackers.close()
        release()
    if stop_requested(stop):
        raise Interrupted(
            f"{stop.name} during the last step: final/ saved, held-out eval skipped", stop.signum
        )
    if not run.main:
        return results
    if cfg.eval.after:
        results["after"] = _run_eval(run.p, step, "after", run.out)
    if cfg.plot:
        plot_metrics(
            read_jsonl(run.out / "metrics.jsonl"),
            run.out / "curves.png",
            title=f"{cfg.model} on {cfg.task.name}: {cfg.algo.advantage} + {cfg.algo.loss}{where}",
            evals=list(read_jsonl(run.out / "evals.jsonl")),
        )
    return results


def _train_loop(run: Run, stop: StopRequests, t_start: float, trackers: Trackers, step_fn) -> int:
    """Steps ``start + 1`` .. ``max_steps`` (each ``step_fn(step)``); returns the last step done.

    Order within a step, which crash safety rests on: the step runs; its metrics and samples
    are written (fsynced); only then may it be checkpointed. A stop request is looked at only
    here, between steps, so what is saved is always a completed step under its own name."""
    cfg = run.p.cfg
    bar = progress_bar(cfg, run.start)
    step = run.start
    try:
        for step in range(run.start + 1, cfg.max_steps + 1):
            metrics, samples = step_fn(step)
            overoptimised = record_step(run, step, metrics, samples, trackers, bar)
            if step == cfg.max_steps:
                break  # the last step goes to final/ only
            run.checkpointer.after_step(
                step, cfg.save_every, stop, between=lambda: _periodic_eval(run, step, stop)
            )
            if cfg.max_minutes and dist.any_true(time.monotonic() - t_start >= 60 * cfg.max_minutes):
                log.info(
                    "max_minutes=%g reached after step %d of %d: stopping",
                    cfg.max_minutes,
                    step,
                    cfg.max_steps,
                )
                break
            if overoptimised:
                log.warning("stopping after step %d: %s", step, overoptimised)
                break
    finally:
        bar.close()
    return step


def _periodic_eval(run: Run, step: int, stop: StopRequests) -> None:
    """The held-out eval every ``eval.every`` steps, unless a stop was requested."""
    if run.p.cfg.eval.every and step % run.p.cfg.eval.every == 0 and not stop_requested(stop) and run.main:
        _run_eval(run.p, step, f"step-{step}", run.out)


def _check_distributed(cfg: Config) -> None:
    """What many ranks cannot do yet, as one clear error (nothing to check in one process)."""
    if dist.world_size() == 1:
        return
    dist.check_divisible(cfg.rollout.prompts_per_step, "rollout.prompts_per_step")
