"""The policy update of an RL step: ``algo.num_iterations`` passes over the step's rollouts
(PPO-style reuse), each cut into ``algo.mini_batches`` optimizer steps over whole groups, each of
those into micro-batches whose losses :func:`thinkrl.algorithms.policy_objective` assembles.

With many ranks, each mini-batch is normalised by the global rows and tokens, so the gradients
summed over the ranks (``dist.sum_gradients``) are those of the one-process loss on the global batch.
"""

from __future__ import annotations

import torch

from thinkrl.algorithms import (
    KL_ESTIMATORS,
    LossParams,
    Objective,
    advantage_weighted,
    aggregation_share,
    loss_agg_for,
    policy_objective,
)
from thinkrl.algorithms.objective import OWN_METRICS
from thinkrl.config import Config, ConfigError
from thinkrl.distributed import torch_dist as dist
from thinkrl.trainer.batch import logps_of, split_grouped_micro_batches, token_logps
from thinkrl.trainer.common import optimizer_pass


def objective_for(cfg: Config, loss_fn, kl_in_loss: bool) -> Objective:
    """The configured objective with policy loss ``loss_fn`` (``algo.loss``'s registered function)."""
    a = cfg.algo
    return Objective(
        loss=loss_fn,
        agg=loss_agg_for(a.advantage, a.loss, a.loss_agg),
        hp=LossParams(
            clip_low=a.clip_eps,
            clip_high=a.clip_eps_high if a.clip_eps_high is not None else a.clip_eps,
            clip_c=a.clip_c,
            tau=a.tau,
        ),
        norm=float(cfg.rollout.max_new_tokens),
        kl=KL_ESTIMATORS.get(a.kl_estimator) if kl_in_loss else None,
        kl_coef=a.kl_coef,
        entropy_coef=a.entropy_coef,
        tis_cap=a.tis_cap,
        advantage_weighted=advantage_weighted(a.loss),
    )


def policy_update(
    p, ro, adv: torch.Tensor, mask: torch.Tensor, obj: Objective, fixed=None, before_step=None
) -> dict:
    """Update ``p.model`` on rollouts ``ro`` with advantages ``adv`` [N, T] and policy-token
    ``mask`` [N, T]; returns the update's metrics. ``fixed`` may hold ``old_logp`` [N, T], already
    computed for the advantages. ``before_step()`` runs before each optimizer step. A pass whose
    loss or gradient norm is not finite is not applied, and ends the update: the result then has
    ``skip_cause`` (thinkrl/trainer/guards.py); passes before it stay applied."""
    cfg, a = p.cfg, p.cfg.algo
    N, T = adv.shape
    steps, batch_rows, batch_tokens = _mini_batches(p, ro, adv, mask, obj.needs_every_row)
    all_mbs = [mb for mbs, _, _ in steps for mb in mbs]
    old_logp, behaviour, ref_logp = _fixed_logps(p, ro, all_mbs, N, T, fixed, obj)
    tensors = {"adv": adv, "mask": mask, "old_logp": old_logp, "behaviour": behaviour, "ref_logp": ref_logp}
    acc = _Sums()
    p.model.train()
    cause, pass_loss = None, 0.0
    for it in range(a.num_iterations):
        last = it == a.num_iterations - 1
        for mbs, step_rows, step_tokens in steps:
            share = aggregation_share(obj.agg, step_rows, step_tokens, batch_rows, batch_tokens)

            def loss_of(mb):
                loss, metrics = _micro_batch_loss(p, mb, tensors, obj, last, step_rows, step_tokens)
                acc.add(metrics, share, first=it == 0, last=last)
                return loss, metrics["loss"] * share  # the loss over the whole batch: this part's share

            pass_loss, acc.sums["grad_norm"], cause = optimizer_pass(
                p.model,
                p.optimizer,
                mbs,
                loss_of,
                cfg.optim.max_grad_norm,
                sched=p.scheduler,
                before_step=before_step,
            )
            if cause is not None:
                break
        if cause is not None:
            break
    out = acc.summary(all_mbs, obj, optimizer_steps=a.num_iterations * len(steps))
    if cause is not None:
        out.update(skip_cause=cause, loss=pass_loss)
    return out


def _micro_batch_loss(p, mb, tensors: dict, obj: Objective, last: bool, step_rows: float, step_tokens: float):
    """The objective of one micro-batch (:func:`thinkrl.algorithms.policy_objective`) on its rows of
    the step's [N, T] ``tensors`` (``adv``, ``mask``, and ``old_logp``, ``behaviour``, ``ref_logp``
    or None); the entropy is measured on the last pass, and has a gradient with a bonus."""
    logp, ent = token_logps(
        p.model,
        mb,
        temperature=p.cfg.rollout.temperature,
        bf16=p.bf16,
        with_entropy=last,
        entropy_grad=obj.entropy_coef > 0,
    )  # [b, T']
    Tm = mb.mask.shape[1]
    rows = {  # this micro-batch's rows of each step tensor, on the model's device
        k: x[mb.index, :Tm].to(logp.device) if x is not None else None for k, x in tensors.items()
    }
    m = mb.mask.to(logp.device) * rows["mask"]  # [b, T'] policy tokens only (multi-turn: no observations)
    return policy_objective(
        logp,
        rows["old_logp"] if rows["old_logp"] is not None else logp.detach(),
        rows["adv"],
        m,
        obj,
        step_rows=step_rows,
        step_tokens=step_tokens,
        entropy=ent,
        ref_logp=rows["ref_logp"],
        behaviour_logp=rows["behaviour"],
    )


def _mini_batches(p, ro, adv: torch.Tensor, mask: torch.Tensor, needs_every_row: bool):
    """The optimizer steps of one pass: ``(micro-batches, rows, tokens)`` each, with the rows
    and tokens of the step over every rank, and the batch's rows and tokens over every rank.

    The mini-batches split the global batch's groups as one process would (fewer if dynamic
    sampling kept fewer groups), and each rank takes its own groups of each (possibly none: it
    then adds zero gradients). A group whose advantages are all zero adds nothing to an
    advantage-weighted loss; unless a KL or entropy term or the loss itself needs it, it gets no
    micro-batch, but it still counts in the rows and tokens, so the loss is unchanged."""
    cfg = p.cfg
    G, N = cfg.rollout.group_size, adv.shape[0]

    def trains(g: int) -> bool:  # a NaN advantage is not a zero one: its group stays, for the loss guard
        return needs_every_row or not bool((adv[g * G : (g + 1) * G] == 0).all())

    n_groups = N // G
    first = dist.rank() * n_groups  # this rank holds global groups first .. first + n_groups - 1
    chunks = [
        [g - first for g in c.tolist() if first <= g < first + n_groups]
        for c in torch.arange(n_groups * dist.world_size()).tensor_split(cfg.algo.mini_batches)
        if len(c)
    ]
    steps = []  # (micro-batches, rows, tokens) of each mini-batch; rows and tokens count skipped groups
    for chunk in chunks:
        rows = [r for g in chunk for r in range(g * G, (g + 1) * G)]
        trained = [g for g in chunk if trains(g)]
        mbs = split_grouped_micro_batches(
            ro.prompt_ids, ro.completion_ids, trained, G, cfg.optim.micro_batch_size, p.tok.pad_token_id
        )
        steps.append((mbs, len(rows), float(mask[rows].sum())))
    counts = dist.sum_floats(
        [x for _, rows, tokens in steps for x in (rows, tokens)] + [N, float(mask.sum())]
    )
    steps = [(mbs, counts[2 * i], counts[2 * i + 1]) for i, (mbs, _, _) in enumerate(steps)]
    return steps, counts[-2], counts[-1]


def _fixed_logps(p, ro, mbs, N: int, T: int, fixed, obj: Objective):
    """Log-probs [N, T] that stay fixed during the update, or None: the sampling policy's
    (pi_old, recomputed by the trainer before any step when a later step needs it), the engine's
    (pi_behaviour) and the reference's (when the KL is in the loss)."""
    a, temp = p.cfg.algo, p.cfg.rollout.temperature
    old_logp = (fixed or {}).get("old_logp")
    if old_logp is None and (a.num_iterations > 1 or a.mini_batches > 1):
        old_logp = logps_of(p.model, mbs, N, T, temperature=temp, bf16=p.bf16)
    behaviour = behaviour_logps(ro, N, T)
    if obj.tis_cap is not None and behaviour is None:
        raise ConfigError(
            "algo.tis_cap needs the rollout engine's log-probs; this engine gives none "
            "(choose a rollout.backend that returns them)"
        )
    ref_logp = p.ref.logps(mbs, N, T, temperature=temp, bf16=p.bf16) if obj.kl is not None else None
    return old_logp, behaviour, ref_logp


def behaviour_logps(ro, N: int, T: int) -> torch.Tensor | None:
    """The rollout engine's log-probs of its sampled tokens as an [N, T] tensor, or None."""
    if ro.logps is None:
        return None
    out = torch.zeros(N, T)
    for i, lp in enumerate(ro.logps):
        out[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
    return out


class _Sums:
    """The update's metrics, summed over micro-batches: those of the last pass, and the
    rollout engine's log-prob mismatch on the first (before any step moved pi_old's copy)."""

    def __init__(self):
        self.sums = {"loss": 0.0, "kl": 0.0, "entropy": 0.0, "tokens": 0.0, "grad_norm": 0.0}
        self.mismatch = {"sum": 0.0, "max": 0.0, "tokens": 0.0, "tis": 0.0}
        self.loss_metrics: dict[str, float] = {}

    def add(self, m: dict, share: float, first: bool, last: bool) -> None:
        n_tok = m["tokens"]
        if first and "mismatch_sum" in m:
            self.mismatch["sum"] += m["mismatch_sum"]
            self.mismatch["max"] = max(self.mismatch["max"], m["mismatch_max"])
            self.mismatch["tokens"] += n_tok
            if "tis_sum" in m:
                self.mismatch["tis"] += m["tis_sum"]
        if last:
            self.sums["loss"] += m["loss"] * share
            self.sums["entropy"] += m["entropy_sum"]
            self.sums["tokens"] += n_tok
            for k, v in m.items():
                if k not in OWN_METRICS:
                    self.loss_metrics[k] = self.loss_metrics.get(k, 0.0) + v * n_tok
            if "kl_sum" in m:
                self.sums["kl"] += m["kl_sum"]

    def summary(self, all_mbs, obj: Objective, optimizer_steps: int) -> dict:
        sums, loss_metrics, mismatch = _reduce_update_metrics(self.sums, self.loss_metrics, self.mismatch)
        trained = dist.sum_floats([sum(int(mb.mask.shape[0]) for mb in all_mbs)])[0]
        n = max(sums["tokens"], 1.0)
        out = {
            "loss": sums["loss"],
            "grad_norm": sums["grad_norm"],
            "clip_frac": 0.0,
            **{k: v / n for k, v in loss_metrics.items()},
            "entropy": sums["entropy"] / n if trained else float("nan"),
            "trained_seqs": int(trained),
            "optimizer_steps": optimizer_steps,
        }
        if obj.kl is not None:
            out["kl"] = sums["kl"] / n
        if mismatch["tokens"]:
            out["logp_mismatch_mean"] = mismatch["sum"] / mismatch["tokens"]
            out["logp_mismatch_max"] = mismatch["max"]
            if obj.tis_cap is not None:
                out["tis_weight_mean"] = mismatch["tis"] / mismatch["tokens"]
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
