"""The RL loop: sample, score, compute advantages, update. One step reads top to bottom.

    prompts -> rollout engine -> completions -> rewards -> advantages
      -> policy loss (+ KL, entropy) -> optimizer step (+ critic step) -> logs, checkpoints

Every algorithm is the same loop with different registered parts (``algo.advantage``,
``algo.loss``, ``algo.kl_estimator`` placed by ``algo.kl_in``, ``algo.loss_agg``):
GRPO, Dr. GRPO, RLOO, REINFORCE, REINFORCE++(-baseline), Kimi's mirror descent, and
PPO, whose critic lives in :mod:`thinkrl.trainer.critic`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from thinkrl import device, sandbox
from thinkrl.algorithms import (
    ADVANTAGES,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    AdvantageInput,
    LossParams,
    MovingAverage,
    advantage_weighted,
    aggregate,
    kl_in_for,
    loss_agg_for,
    needs_values,
    tis_weights,
    uses_batch_statistics,
)
from thinkrl.config import Config, ConfigError, save_config
from thinkrl.device import use_bf16
from thinkrl.distributed import torch_dist as dist
from thinkrl.envs import build_env
from thinkrl.envs.episodes import evaluate_episodes, generate_and_score_episodes, tool_metrics
from thinkrl.eval import eval_settings, evaluate, write_json
from thinkrl.eval.metrics import reflection_stats
from thinkrl.models import load_model
from thinkrl.rewards import RewardModel
from thinkrl.rewards.code import runs_code
from thinkrl.rollout import SamplingParams, build_engine, build_scorer
from thinkrl.rollout.scoring import completion_stats, mode_stats, sample_and_score
from thinkrl.sampling import Groups, build_sampler, collect_groups
from thinkrl.tasks import build_task
from thinkrl.tasks.templates import drop_long_prompts
from thinkrl.trainer import checkpoint as ckpt
from thinkrl.trainer.batch import policy_token_mask, split_grouped_micro_batches, token_logps
from thinkrl.trainer.common import (
    apply_lora,
    enable_gradient_checkpointing,
    is_lora,
    lr_schedule,
    seed_everything,
)
from thinkrl.trainer.critic import Critic, critic_path, prune_critic
from thinkrl.trainer.guards import BadStepGuard, skip_cause
from thinkrl.trainer.interrupt import Interrupted, StopRequests, failpoint
from thinkrl.trainer.logs import JsonlWriter, plot_metrics, read_jsonl
from thinkrl.trainer.monitor import Monitor
from thinkrl.trainer.tracking import Trackers

log = logging.getLogger(__name__)


@dataclass
class Parts:
    """Everything a step needs, built once."""

    cfg: Config
    model: object
    ref: Reference | None  # pi_ref of the KL term; None when algo.kl_coef = 0
    tok: object
    task: object
    rewards: RewardModel
    engine: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    bf16: bool
    sampler: object = None  # thinkrl.sampling: which prompts each step draws
    critic: Critic | None = None  # gae only
    baseline: MovingAverage | None = None  # reinforce's moving-average reward baseline, when configured
    dev: str = (
        "cpu"  # where the models compute (thinkrl/device.py); the step's [N, T] tensors stay on the CPU
    )
    env: object = None  # thinkrl.envs: a multi-turn environment, or None for single-turn episodes


class Reference:
    """The reference policy pi_ref of the KL penalty: the initial weights, frozen.

    Without LoRA that is a second model, loaded from ``cfg.model``. With LoRA the base
    weights never train, so pi_ref is the policy itself with its adapter switched off
    (``peft``'s ``disable_adapter``): no second copy of the weights in memory, and the
    same log-probs bit for bit as a freshly loaded base model.
    """

    def __init__(self, model=None, adapter_off: bool = False, scorer=None):
        self.model, self.adapter_off, self.scorer = model, adapter_off, scorer

    @classmethod
    def for_policy(cls, policy, tok, cfg: Config, bf16: bool, dev: str = "cpu") -> Reference:
        if is_lora(policy):
            return cls(policy, adapter_off=True)
        ref, _ = load_model(cfg.model)
        # The reference never changes: where the backend can score, keep only its copy of the
        # weights (the fast engine's fused bf16 one: no autograd, each prompt run once per group).
        scorer = build_scorer(cfg.rollout.backend, ref, tok, bf16=bf16, device=dev)
        if scorer is not None:
            return cls(scorer=scorer)
        return cls(ref.to(dev).eval().requires_grad_(False))

    def logps(self, p: Parts, mbs, N: int, T: int) -> torch.Tensor:
        """log pi_ref of every row in ``mbs``: [N, T], without gradients."""
        if self.scorer is not None:
            out = torch.zeros(N, T)
            for mb in mbs:
                out[mb.index, : mb.mask.shape[1]] = self.scorer.score(mb, p.cfg.rollout.temperature)
            return out
        with self.model.disable_adapter() if self.adapter_off else contextlib.nullcontext():
            return _logps_of(self.model, mbs, N, T, p)


def lr_lambda(cfg: Config, total: int):
    o = cfg.optim
    return lr_schedule(o.warmup_steps, total, o.schedule, o.min_lr_ratio)


# ---------------------------------------------------------------------------
# One step


def rl_step(p: Parts, step: int) -> tuple[dict, list[dict]]:
    cfg = p.cfg
    failpoint("generate", step)

    # 1-2. Sample G completions for each prompt and score them. With DAPO dynamic sampling,
    # groups whose rewards are all equal are dropped and refilled (thinkrl/sampling/dynamic.py).
    timings = {"time_generate": 0.0, "time_score": 0.0}
    draw, seeds = dist.sharded_draw(p.sampler.next_batch), _group_seeds(cfg, step)
    kept, seen, dyn_stats = collect_groups(
        draw,
        lambda exs: generate_and_score(p, exs, timings, seeds),
        cfg.rollout.prompts_per_step,
        dynamic=cfg.sampling.dynamic,
        max_rounds=cfg.sampling.max_rounds,
    )
    seen = dist.gather_groups(
        seen, draw.last
    )  # with many ranks: every rank's groups, for metrics and the sampler
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
    cfg, G = p.cfg, p.cfg.rollout.group_size
    examples, ro, totals = kept.examples, kept.ro, kept.totals

    # 3. Advantages: per token, from the rewards and whatever the estimator reads.
    t0 = time.perf_counter()
    a = cfg.algo
    N = len(ro.completion_ids)
    T = max(len(c) for c in ro.completion_ids)
    lengths = torch.tensor([len(c) for c in ro.completion_ids])  # [N]
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float() * policy_token_mask(ro, T)  # [N, T]
    rewards = torch.tensor(totals, dtype=torch.float32)  # [N]
    group_ids = torch.arange(len(examples)).repeat_interleave(G)  # [N]
    mbs = split_grouped_micro_batches(
        ro.prompt_ids,
        ro.completion_ids,
        list(range(len(examples))),
        G,
        cfg.optim.micro_batch_size,
        p.tok.pad_token_id,
    )
    fixed = advantage_inputs(p, mbs, N, T)  # old_logp/ref_logp (KL in the reward), values (critic)
    token_kl = None
    if "ref_logp" in fixed:
        token_kl = KL_ESTIMATORS.get(a.kl_estimator)(fixed["old_logp"], fixed["ref_logp"]) * mask  # [N, T]
    est = dist.advantages(
        ADVANTAGES.get(a.advantage),
        AdvantageInput(
            rewards,
            group_ids,
            mask,
            token_kl=token_kl,
            kl_coef=a.kl_coef,
            values=fixed.get("values"),
            baseline=p.baseline.value if p.baseline else 0.0,
            gamma=a.gamma,
            lam=a.lam,
            eps=a.std_eps,
        ),
        whole_batch=uses_batch_statistics(a.advantage),
    )

    # 4. Update the policy (and the critic).
    train_metrics = policy_update(p, ro, est.adv, mask, fixed, step=step)
    p.engine.sync_weights(p.model)  # the next rollouts sample from the updated policy
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

    metrics = {
        "step": step,
        # reward, accuracy, lengths and reflection over every group generated this step (with dynamic
        # sampling, also the dropped ones: the kept ones alone would overstate a mixed success rate)
        **_sample_metrics(cfg, seen),
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
    """How this step's rollouts are seeded: an iterator of this rank's per-group seeds
    (``distributed.seed_by_group``: one engine call per group); one seed for the step's
    batched call, from the step and the rank, when there are several ranks (each rank then
    samples its own stream, also after a resume, which restores rank 0's RNG); or None in
    one process: one batched call on the process's RNG, as always."""
    if cfg.distributed.seed_by_group:
        start = dist.rank() * (cfg.rollout.prompts_per_step // dist.world_size())
        return (dist.group_seed(cfg.seed, step, g) for g in itertools.count(start))
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
        return generate_and_score_episodes(p.engine, p.tok, p.env, p.rewards, cfg, examples, timings)
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


def _logps_of(model, mbs, N: int, T: int, p: Parts) -> torch.Tensor:
    """Log-probs [N, T] of every row in ``mbs`` under ``model``, without gradients."""
    out = torch.zeros(N, T)
    with torch.no_grad():
        for mb in mbs:
            out[mb.index, : mb.mask.shape[1]] = token_logps(
                model, mb, temperature=p.cfg.rollout.temperature, bf16=p.bf16
            )[0].to(out.device)
    return out


def advantage_inputs(p: Parts, mbs, N: int, T: int) -> dict:
    """Per-token tensors [N, T] that the estimator needs before any update: the sampling
    policy's and the reference's log-probs when the KL goes in the reward, the critic's values."""
    out = {}
    if p.ref is not None and kl_in_for(p.cfg.algo.advantage, p.cfg.algo.kl_in) == "reward":
        out["old_logp"] = _logps_of(p.model, mbs, N, T, p)
        out["ref_logp"] = p.ref.logps(p, mbs, N, T)
    if p.critic is not None:
        out["values"] = p.critic.values(mbs, N, T)
    return out


def behaviour_logps(ro, N: int, T: int) -> torch.Tensor | None:
    """The rollout engine's log-probs of its sampled tokens as an [N, T] tensor, or None."""
    if ro.logps is None:
        return None
    out = torch.zeros(N, T)
    for i, lp in enumerate(ro.logps):
        out[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
    return out


def policy_update(
    p: Parts, ro, adv: torch.Tensor, mask: torch.Tensor, fixed: dict | None = None, step: int = 0
) -> dict:
    """``num_iterations`` passes over one batch of rollouts (PPO-style reuse), each split into
    ``algo.mini_batches`` optimizer steps over whole groups.

    ``fixed`` may hold ``old_logp`` [N, T] already computed for the advantages. A pass whose
    loss or gradient norm is not finite is not applied, and ends the update: the result then
    has ``skip_cause`` (thinkrl/trainer/guards.py); passes before it stay applied."""
    cfg, a = p.cfg, p.cfg.algo
    N, T = adv.shape
    G = cfg.rollout.group_size
    agg = loss_agg_for(a.advantage, a.loss, a.loss_agg)
    kl_in_loss = p.ref is not None and kl_in_for(a.advantage, a.kl_in) == "loss"
    # A group whose advantages are all zero adds nothing to an advantage-weighted loss; unless a
    # KL or entropy term or the loss itself needs it, it is skipped outright (the normalisers
    # below still count it, so the loss is unchanged).
    needs_all = kl_in_loss or a.entropy_coef > 0 or not advantage_weighted(a.loss)

    # (a NaN advantage is not a zero one: its group stays, so the loss guard sees it)
    def trains(g: int) -> bool:
        return needs_all or not bool((adv[g * G : (g + 1) * G] == 0).all())

    # group ids of each optimizer step (fewer steps if dynamic sampling kept fewer groups). With
    # many ranks the mini-batches split the global batch as one process would, and each rank
    # takes its own groups of each (possibly none: it then adds zero gradients).
    n_groups, first = (
        N // G,
        dist.rank() * (N // G),
    )  # this rank holds global groups first .. first + n_groups - 1
    chunks = [
        [g - first for g in c.tolist() if first <= g < first + n_groups]
        for c in torch.arange(n_groups * dist.world_size()).tensor_split(a.mini_batches)
        if len(c)
    ]
    steps = []  # (micro-batches, rows, tokens) of each mini-batch; rows and tokens count skipped groups
    for chunk in chunks:
        rows = [r for g in chunk for r in range(g * G, (g + 1) * G)]
        steps.append(
            (
                split_grouped_micro_batches(
                    ro.prompt_ids,
                    ro.completion_ids,
                    [g for g in chunk if trains(g)],
                    G,
                    cfg.optim.micro_batch_size,
                    p.tok.pad_token_id,
                ),
                len(rows),
                float(mask[rows].sum()),
            )
        )
    # With many ranks each mini-batch's loss is normalised by the global rows and tokens, so the
    # summed gradients (dist.sum_gradients) are those of the one-process loss on the global batch.
    counts = dist.sum_floats(
        [x for _, rows, tokens in steps for x in (rows, tokens)] + [N, float(mask.sum())]
    )
    steps = [(mbs, counts[2 * i], counts[2 * i + 1]) for i, (mbs, _, _) in enumerate(steps)]
    batch_rows, batch_tokens = counts[-2], counts[-1]
    all_mbs = [mb for mbs, _, _ in steps for mb in mbs]
    policy_loss = POLICY_LOSSES.get(a.loss)
    hp = LossParams(
        clip_low=a.clip_eps,
        clip_high=a.clip_eps_high if a.clip_eps_high is not None else a.clip_eps,
        clip_c=a.clip_c,
        tau=a.tau,
    )
    kl_fn = KL_ESTIMATORS.get(a.kl_estimator)

    # Log-probs that stay fixed during the update: the sampling policy's (pi_old, recomputed by
    # the trainer before any step when a later step needs it), the engine's (pi_behaviour) and
    # the reference's.
    old_logp = (fixed or {}).get("old_logp")
    if old_logp is None and (a.num_iterations > 1 or a.mini_batches > 1):
        old_logp = _logps_of(p.model, all_mbs, N, T, p)
    behaviour = behaviour_logps(ro, N, T)
    if a.tis_cap is not None and behaviour is None:
        raise ConfigError(
            "algo.tis_cap needs the rollout engine's log-probs; this engine gives none "
            "(choose a rollout.backend that returns them)"
        )
    ref_logp = p.ref.logps(p, all_mbs, N, T) if kl_in_loss else None

    sums = {"loss": 0.0, "kl": 0.0, "entropy": 0.0, "tokens": 0.0, "grad_norm": 0.0}
    mismatch = {"sum": 0.0, "max": 0.0, "tokens": 0.0, "tis": 0.0}
    loss_metrics: dict[str, float] = {}
    p.model.train()
    cause = None
    for it in range(a.num_iterations):
        last = it == a.num_iterations - 1
        for mbs, step_rows, step_tokens in steps:
            p.optimizer.zero_grad(set_to_none=True)
            pass_loss = 0.0
            for mb in mbs:
                logp, ent = token_logps(
                    p.model,
                    mb,
                    temperature=cfg.rollout.temperature,
                    bf16=p.bf16,
                    with_entropy=last,
                    entropy_grad=a.entropy_coef > 0,
                )  # [b, T']
                Tm = mb.mask.shape[1]

                def rows(x):  # this micro-batch's rows of a step tensor [N, T], on the model's device
                    return x[mb.index, :Tm].to(logp.device)

                m = mb.mask.to(logp.device) * rows(
                    mask
                )  # [b, T'] policy tokens only (multi-turn: no observations)
                mb_old = rows(old_logp) if old_logp is not None else logp.detach()
                tok_loss, lm = policy_loss(logp, mb_old, rows(adv), m, hp)  # [b, T']
                if behaviour is not None:
                    gap = (mb_old - rows(behaviour)) * m  # log pi_old - log pi_behaviour
                    if a.tis_cap is not None:
                        w = tis_weights(mb_old, rows(behaviour), a.tis_cap)
                        tok_loss = tok_loss * w
                    if it == 0:
                        mismatch["sum"] += float(gap.abs().sum())
                        mismatch["max"] = max(mismatch["max"], float(gap.abs().max()))
                        mismatch["tokens"] += float(m.sum())
                        if a.tis_cap is not None:
                            mismatch["tis"] += float((w * m).sum())
                kl = None
                if ref_logp is not None:
                    kl = kl_fn(logp, rows(ref_logp))  # [b, T']
                    tok_loss = tok_loss + a.kl_coef * kl
                if a.entropy_coef > 0:
                    tok_loss = tok_loss - a.entropy_coef * ent
                loss = aggregate(tok_loss, m, agg, norm=float(cfg.rollout.max_new_tokens))
                n_tok = float(m.sum())
                weight = n_tok / step_tokens if agg == "token_mean" else m.shape[0] / step_rows
                (loss * weight).backward()
                # the loss over the whole batch: each mini-batch's share of it
                share = step_tokens / batch_tokens if agg == "token_mean" else step_rows / batch_rows
                pass_loss += loss.item() * weight * share
                if last:
                    sums["loss"] += loss.item() * weight * share
                    sums["entropy"] += float((ent.detach() * m).sum())
                    sums["tokens"] += n_tok
                    for k, v in lm.items():
                        loss_metrics[k] = loss_metrics.get(k, 0.0) + v * n_tok
                    if kl is not None:
                        sums["kl"] += float((kl.detach() * m).sum())
            (pass_loss,) = dist.sum_gradients(p.model.parameters(), pass_loss)  # one process: nothing happens
            gn = torch.nn.utils.clip_grad_norm_(p.model.parameters(), cfg.optim.max_grad_norm)
            sums["grad_norm"] = float(gn)
            cause = skip_cause(pass_loss, float(gn))
            if cause is not None:
                p.optimizer.zero_grad(set_to_none=True)
                break
            failpoint("train", step)
            p.optimizer.step()
            p.scheduler.step()
        if cause is not None:
            break
    sums, loss_metrics, mismatch = _reduce_update_metrics(sums, loss_metrics, mismatch)
    trained = dist.sum_floats([sum(int(mb.mask.shape[0]) for mb in all_mbs)])[0]
    n = max(sums["tokens"], 1.0)
    out = {
        "loss": sums["loss"],
        "grad_norm": sums["grad_norm"],
        "clip_frac": 0.0,
        **{k: v / n for k, v in loss_metrics.items()},
        "entropy": sums["entropy"] / n if trained else float("nan"),
        "trained_seqs": int(trained),
        "optimizer_steps": a.num_iterations * len(steps),
    }
    if kl_in_loss:
        out["kl"] = sums["kl"] / n
    if mismatch["tokens"]:
        out["logp_mismatch_mean"] = mismatch["sum"] / mismatch["tokens"]
        out["logp_mismatch_max"] = mismatch["max"]
        if a.tis_cap is not None:
            out["tis_weight_mean"] = mismatch["tis"] / mismatch["tokens"]
    if cause is not None:
        out.update(skip_cause=cause, loss=pass_loss)
    return out


def _reduce_update_metrics(sums: dict, loss_metrics: dict, mismatch: dict) -> tuple[dict, dict, dict]:
    """The update's sums over every rank (one process: as they are). The loss and the grad norm
    are already global (summed with the gradients)."""
    if dist.world_size() == 1:
        return sums, loss_metrics, mismatch
    local = {
        **{f"s/{k}": v for k, v in sums.items() if k != "grad_norm"},
        **{f"l/{k}": v for k, v in loss_metrics.items()},
        **{f"m/{k}": v for k, v in mismatch.items()},
    }
    tot = dist.reduce_dict(local, max_keys=("m/max",))
    sums = {**sums, **{k[2:]: v for k, v in tot.items() if k.startswith("s/")}}
    return (
        sums,
        {k[2:]: v for k, v in tot.items() if k.startswith("l/")},
        {k[2:]: v for k, v in tot.items() if k.startswith("m/")},
    )


# ---------------------------------------------------------------------------
# The run


def build_parts(cfg: Config, resume_from: Path | None = None) -> Parts:
    """Build the policy, reference, engine, optimizer and the rest; ``resume_from`` is a
    step checkpoint whose weights the policy starts from (its trainer state is loaded by
    the caller)."""
    dev = device.resolve_device(cfg.device)
    device.setup(dev)  # the CPU performance policy, on the CPU only
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    bf16 = use_bf16(cfg.dtype, dev)
    log.info(
        "%s; this run (dtype=%s) computes in %s", device.describe(dev), cfg.dtype, "bf16" if bf16 else "fp32"
    )
    task = build_task(cfg.task)
    sandbox.configure(cfg.sandbox.allow_unconfined)
    env = build_env(cfg.env)
    if runs_code(cfg.rewards, task.train + task.eval) or getattr(env, "runs_code", False):
        sandbox.require_isolation()  # refuse now, not at the first reward, where isolation is impossible
    with dist.main_first():  # rank 0 builds a built-in model's cache folder, the others then load it
        model, tok = load_policy(cfg, resume_from, dev)
    dist.broadcast_parameters(model)  # equal replicas from the start, whatever the loading did
    drop_long_prompts(task, tok, cfg.task)
    ref = Reference.for_policy(model, tok, cfg, bf16, dev) if cfg.algo.kl_coef > 0 else None  # beta = 0: none
    engine = build_engine(
        cfg.rollout.backend, model, tok, batch_size=cfg.rollout.batch_size, bf16=bf16, device=dev
    )
    log.info("rollout engine: %s", engine.describe())
    trainable = [q for q in model.parameters() if q.requires_grad]  # with LoRA: the adapters only
    opt = torch.optim.AdamW(
        trainable,
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        weight_decay=cfg.optim.weight_decay,
        fused=True,
    )  # one pass per tensor, ~8x faster on CPU
    total = cfg.max_steps * cfg.algo.num_iterations * cfg.algo.mini_batches  # optimizer steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))
    critic = Critic.from_config(cfg, bf16, dev) if needs_values(cfg.algo.advantage) else None
    baseline = MovingAverage(cfg.algo.baseline_decay) if cfg.algo.baseline_decay is not None else None
    return Parts(
        cfg,
        model,
        ref,
        tok,
        task,
        RewardModel(cfg.rewards, cfg.reward_args),
        engine,
        opt,
        sched,
        bf16,
        sampler=build_sampler(task, cfg),
        critic=critic,
        baseline=baseline,
        dev=dev,
        env=env if env.multi_turn else None,
    )


def load_policy(cfg: Config, resume_from: Path | None = None, dev: str = "cpu"):
    """The policy to train and its tokenizer. Full fine-tuning starts from ``resume_from``'s
    weights when resuming. LoRA always starts from ``cfg.model`` (the frozen base, which is
    also the KL reference) and, when resuming, loads the adapter saved in the checkpoint."""
    lora = cfg.lora.enabled
    if resume_from is not None and lora != ckpt.has_adapter(resume_from):
        raise ConfigError(
            f"{resume_from} was trained {'without' if lora else 'with'} LoRA: resume it with "
            f"lora.enabled={'false' if lora else 'true'} (and the same lora.* settings)"
        )
    model, tok = load_model(str(resume_from) if resume_from is not None and not lora else cfg.model)
    if getattr(model.config, "use_cache", None) is not None:
        model.config.use_cache = False  # training forward passes keep no KV cache
    model.to(dev).set_attn_implementation(device.train_attention(dev))  # eager on the CPU, SDPA on CUDA
    if cfg.optim.gradient_checkpointing:
        enable_gradient_checkpointing(model)  # before peft wraps the model
    model = apply_lora(model, cfg.lora)
    if lora and resume_from is not None:
        ckpt.load_adapter(model, resume_from)
    return model, tok


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


def train(cfg: Config) -> dict:
    """Run (or resume) RL training as configured; returns the held-out results.

    Crash safety (docs/checkpoints.md): a ``kill -9`` loses at most
    the steps since the last checkpoint, and a resumed run continues exactly. SIGINT and
    SIGTERM stop after the current step and save it (thinkrl/trainer/interrupt.py)."""
    if cfg.distributed.backend == "ray":  # rollout workers on Ray, the same steps (docs/distributed-ray.md)
        from thinkrl.distributed.ray_driver import train_ray

        return train_ray(cfg)
    out = Path(cfg.output_dir)
    dist.init(cfg.distributed.strategy)
    _check_distributed(cfg)
    with dist.main_first():  # rank 0 alone tidies the folder after a crash
        found = ckpt.resume_point(out, cfg.resume)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)

    p = build_parts(cfg, found[0] if found else None)
    main = dist.is_main()  # only rank 0 writes files (config, logs, evals, plots, checkpoints)
    if main:
        save_config(
            cfg, out / "config.yaml"
        )  # after build_parts: a resume that cannot start leaves the run as it was
    guard = BadStepGuard(cfg.optim.max_bad_steps)
    start = _restore(p, guard, out, *found) if found else 0

    logs = {
        name: JsonlWriter(out / f"{name}.jsonl", truncate_after_step=start) if main else _NoWriter()
        for name in ("metrics", "samples")
    }
    # evals of steps being redone go; a fresh start also drops the "before" eval of a run that died early
    if main:
        JsonlWriter(out / "evals.jsonl", truncate_after_step=start if start else -1)
    dist.barrier()  # rank 0 has truncated the logs that a resumed run's monitor reads
    results: dict = {}
    if cfg.eval.before and start == 0 and main:
        results["before"] = _run_eval(p, 0, "before", out)

    monitor = Monitor(cfg.monitor.gold, cfg.monitor.proxy, cfg.monitor.window)
    for m in read_jsonl(out / "metrics.jsonl") if monitor.active else []:  # a resumed run's history
        monitor.update(m)
    trackers = Trackers(
        cfg.log.backends if main else ["jsonl"], out, cfg.log.project, cfg.to_dict(), out.name
    )
    t_start = time.monotonic()  # max_minutes counts the training loop of this process
    try:
        with StopRequests() as stop:
            step = _train_loop(p, guard, out, start, logs, stop, t_start, monitor, trackers)
            results["train_minutes"] = (time.monotonic() - t_start) / 60
            log.info("training loop: steps %d-%d in %.2f min", start + 1, step, results["train_minutes"])
            _save(p, guard, out, step, out / "final")  # step < max_steps when max_minutes stopped the run
    finally:
        trackers.close()
    if _stop(stop):
        raise Interrupted(
            f"{stop.name} during the last step: final/ saved, held-out eval skipped", stop.signum
        )
    if not main:
        return results
    if cfg.eval.after:
        results["after"] = _run_eval(p, step, "after", out)
    if cfg.plot:
        evals = [e for e in read_jsonl(out / "evals.jsonl")]
        plot_metrics(
            read_jsonl(out / "metrics.jsonl"),
            out / "curves.png",
            title=f"{cfg.model} on {cfg.task.name}: {cfg.algo.advantage} + {cfg.algo.loss}",
            evals=evals,
        )
    return results


def _train_loop(
    p: Parts,
    guard: BadStepGuard,
    out: Path,
    start: int,
    logs: dict,
    stop: StopRequests,
    t_start: float,
    monitor: Monitor,
    trackers: Trackers,
) -> int:
    """Steps ``start + 1`` .. ``max_steps``; returns the last step done.

    Order within a step, which crash safety rests on: the step runs; its metrics and samples
    are written (fsynced); only then may it be checkpointed. A stop request is looked at only
    here, between steps, so what is saved is always a completed step under its own name."""
    cfg = p.cfg
    bar = _progress(cfg, start)
    step = start
    try:
        for step in range(start + 1, cfg.max_steps + 1):
            metrics, samples = rl_step(p, step)
            guard.record(step, metrics)
            overoptimised = monitor.update(metrics)  # adds the slopes it watches to the metrics
            logs["metrics"].write(metrics)
            logs["samples"].write_many(samples)
            trackers.log(metrics, step)
            bar.update(1)
            bar.set_postfix(
                reward=f"{metrics['reward']:.3f}",
                acc=f"{metrics['accuracy']:.3f}",
                len=f"{metrics['response_len_mean']:.0f}",
                s=f"{metrics['step_time']:.1f}",
            )
            if guard.exhausted:  # before anything more is saved: the last checkpoint stays the last good one
                raise guard.error(ckpt.latest_checkpoint(out))
            if step == cfg.max_steps:
                break  # the last step goes to final/ only
            saved = bool(cfg.save_every) and step % cfg.save_every == 0
            if saved:
                _save_step(p, guard, out, step)
            if cfg.eval.every and step % cfg.eval.every == 0 and not _stop(stop) and dist.is_main():
                _run_eval(p, step, f"step-{step}", out)
            if _stop(stop):  # it may have come during the step, the save or the eval
                if not saved:
                    _save_step(p, guard, out, step)
                raise Interrupted(
                    f"{stop.name} during step {step}: saved checkpoints/step-{step}; continue "
                    "with resume=true",
                    stop.signum,
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


def _restore(p: Parts, guard: BadStepGuard, out: Path, path: Path, state: dict) -> int:
    """Load a checkpoint's trainer state into ``p`` (the weights were loaded by build_parts); returns its step."""
    p.optimizer.load_state_dict(state["optimizer"])
    p.scheduler.load_state_dict(state["scheduler"])
    p.task.load_state_dict(state["task"])
    p.sampler.load_state_dict(state.get("sampler", {}))  # checkpoints before samplers have none
    ckpt.set_rng_state(state["rng"])
    guard.load_state_dict(state.get("guard", {}))
    if p.baseline is not None and state.get("baseline"):
        p.baseline.load_state_dict(state["baseline"])
    if p.critic is not None:
        cpath = critic_path(out, path.name)
        if not cpath.is_file():
            raise ConfigError(f"{path} has no critic checkpoint ({cpath}); cannot resume a gae run")
        p.critic.load_state_dict(torch.load(cpath, weights_only=True, map_location="cpu"))
    log.info("resumed from %s at step %d", path, state["step"])
    return state["step"]


def _save(p: Parts, guard: BadStepGuard, out: Path, step: int, path: Path) -> None:
    """Checkpoint the state after ``step`` at ``path`` (``checkpoints/step-N`` or ``final``)."""
    state = {
        "step": step,
        "optimizer": p.optimizer.state_dict(),
        "scheduler": p.scheduler.state_dict(),
        "task": p.task.state_dict(),
        "sampler": p.sampler.state_dict(),
        "rng": ckpt.rng_state(),
        "baseline": p.baseline.state_dict() if p.baseline else None,
        "guard": guard.state_dict(),
    }
    if not dist.is_main():  # the replicas are equal: rank 0's weights and optimizer are everyone's
        return dist.barrier()
    if p.critic is not None:  # first, so that every policy checkpoint has its critic
        p.critic.save(critic_path(out, path.name), with_optimizer=path.name != "final")
    ckpt.save_checkpoint(path, p.model, p.tok, state)
    dist.barrier()


def _save_step(p: Parts, guard: BadStepGuard, out: Path, step: int) -> None:
    _save(p, guard, out, step, out / "checkpoints" / f"step-{step}")
    if dist.is_main():
        ckpt.prune_checkpoints(out, p.cfg.keep_checkpoints)
        prune_critic(out, {c.name for _, c in ckpt.list_checkpoints(out)})


def _stop(stop: StopRequests) -> bool:
    """Whether a signal asked this run to stop: on any rank, so that all ranks stop together."""
    return dist.any_true(stop.requested)


class _NoWriter:
    """The metrics and samples log of a rank other than 0, which writes no files."""

    def write(self, obj: dict) -> None:
        pass

    def write_many(self, objs: list) -> None:
        pass


def _check_distributed(cfg: Config) -> None:
    """What many ranks cannot do yet, as one clear error (nothing to check in one process)."""
    if dist.world_size() == 1:
        return
    dist.check_divisible(cfg.rollout.prompts_per_step, "rollout.prompts_per_step")
    if cfg.sampling.dynamic:
        raise ConfigError(
            "sampling.dynamic=true is not data-parallel yet (ranks would refill different numbers "
            "of groups): run it in one process"
        )
    if cfg.env.name != "single_turn":
        raise ConfigError(
            f"env.name={cfg.env.name} (multi-turn episodes) is not data-parallel yet (their sampling "
            "is not seeded per rank): run it in one process"
        )
    if needs_values(cfg.algo.advantage):
        raise ConfigError(
            "algo.advantage=gae is not data-parallel yet (its critic trains in one process): run it "
            "in one process"
        )


def _progress(cfg: Config, start: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=cfg.max_steps,
        initial=start,
        desc="train",
        disable=not cfg.progress or not dist.is_main(),
        dynamic_ncols=True,
    )
