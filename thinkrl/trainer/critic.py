"""The critic of PPO (``algo.advantage=gae``): a value model V(s_t), its update and its checkpoints.

The value model is a causal-LM backbone (a copy of the policy's initial weights, or
``algo.critic_model``) with a scalar head ``nn.Linear(H, 1)`` in place of the LM
head. It reads the same hidden positions as the policy's log-probs
(:func:`thinkrl.trainer.batch.completion_hidden`): the value of token t is the value
of the state before token t, on the same grouped micro-batch layout (each prompt run
once). It has its own AdamW optimizer at a constant ``algo.critic_lr`` and is trained
with PPO's clipped value loss on the returns of :func:`thinkrl.algorithms.advantages.gae`.

Checkpoints live next to the policy's, never inside its HF folder (which must stay
loadable by ``AutoModelForCausalLM``): ``<run>/critic/step-N.pt`` and
``<run>/critic/final.pt``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from thinkrl.algorithms import aggregate, aggregation_share, value_loss
from thinkrl.distributed import torch_dist as dist
from thinkrl.errors import ConfigError
from thinkrl.models import load_model
from thinkrl.rollout import autocast
from thinkrl.trainer.batch import MicroBatch, completion_hidden, fill_rows
from thinkrl.trainer.checkpoint import fsync_path
from thinkrl.trainer.common import adamw, optimizer_pass


class ValueModel(nn.Module):
    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1)
        # V = 0 at the start: the first advantages are the plain returns, not noise from a random head
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, mb: MicroBatch, bf16: bool = False) -> Tensor:
        """Values [b, T] on the micro-batch's device (the CPU, like the step's tensors), computed
        on the model's."""
        dev = self.head.weight.device
        on = mb.to(dev)
        with autocast(bf16, dev):
            hidden = completion_hidden(self.backbone, on)  # [b, T, H]
        return (self.head(hidden.float()).squeeze(-1) * on.mask).to(mb.mask.device)  # [b, T, 1] -> [b, T]


def build_value_model(model_path: str) -> ValueModel:
    lm, _ = load_model(model_path)
    backbone = getattr(lm, lm.base_model_prefix)  # drop the LM head
    if getattr(backbone.config, "use_cache", None) is not None:
        backbone.config.use_cache = False
    return ValueModel(backbone, lm.config.hidden_size)


class Critic:
    def __init__(
        self,
        value_model: ValueModel,
        *,
        lr: float,
        betas=(0.9, 0.99),
        weight_decay: float = 0.0,
        vf_clip: float | None = 0.2,
        max_grad_norm: float = 1.0,
        bf16: bool = False,
    ):
        self.model = value_model
        self.optimizer = adamw(value_model.parameters(), lr, weight_decay, betas)
        self.vf_clip, self.max_grad_norm, self.bf16 = vf_clip, max_grad_norm, bf16

    @classmethod
    def from_config(cls, cfg, bf16: bool, dev: str = "cpu") -> Critic:
        a = cfg.algo
        value_model = build_value_model(a.critic_model or cfg.model).to(dev)
        dist.broadcast_parameters(value_model)  # many ranks: equal replicas, kept equal by summed gradients
        return cls(
            value_model,
            lr=a.critic_lr,
            betas=cfg.optim.betas,
            weight_decay=cfg.optim.weight_decay,
            vf_clip=a.vf_clip,
            max_grad_norm=cfg.optim.max_grad_norm,
            bf16=bf16,
        )

    @torch.no_grad()
    def values(self, mbs: list[MicroBatch], N: int, T: int) -> Tensor:
        """V(s_t) for every completion token of the step: [N, T], zero on padding."""
        return fill_rows(mbs, N, T, lambda mb: self.model(mb, self.bf16))

    def update(
        self, mbs: list[MicroBatch], returns: Tensor, old_values: Tensor, num_iterations: int = 1
    ) -> dict:
        """``num_iterations`` passes of the clipped value loss (token mean over the step); returns metrics.

        A pass with a non-finite loss or gradient norm is not applied and ends the update, as
        for the policy (thinkrl/trainer/guards.py); the metrics then say ``critic_skip_cause``."""
        # many ranks: the global token count, so the summed gradients are the one-process gradient
        total = max(dist.sum_floats([float(sum(mb.mask.sum() for mb in mbs))])[0], 1.0)
        self.model.train()
        sums = {"value_loss": 0.0, "vf_clip_frac": 0.0}
        gn, cause = 0.0, None
        for it in range(num_iterations):
            last = it == num_iterations - 1

            def loss_of(mb: MicroBatch) -> tuple[Tensor, float]:
                m = mb.mask  # [b, T']
                Tm = m.shape[1]
                v = self.model(mb, self.bf16)  # [b, T']
                tok_loss, lm = value_loss(
                    v, old_values[mb.index, :Tm], returns[mb.index, :Tm], m, self.vf_clip
                )
                loss = aggregate(tok_loss, m, "token_mean")
                weight = aggregation_share("token_mean", m.shape[0], float(m.sum()), len(mbs), total)
                if last:
                    sums["value_loss"] += loss.item() * weight
                    sums["vf_clip_frac"] += lm["vf_clip_frac"] * weight
                return loss * weight, loss.item() * weight

            _, gn, cause = optimizer_pass(self.model, self.optimizer, mbs, loss_of, self.max_grad_norm)
            if cause is not None:
                break
        out = {
            **dist.reduce_dict(sums),
            "critic_grad_norm": float(gn),
            **value_stats(*dist.gather_rows(old_values, returns, _full_mask(mbs, returns))),
        }
        return out if cause is None else {**out, "critic_skip_cause": cause}

    # -- checkpoints ---------------------------------------------------------

    def state_dict(self, with_optimizer: bool = True) -> dict:
        state = {"model": self.model.state_dict()}
        if with_optimizer:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])

    def save(self, path: Path, with_optimizer: bool = True) -> Path:
        """Write atomically and durably: a crash never leaves a truncated file under the final name."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(with_optimizer), tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
        return path

    # -- beside the policy's checkpoints (thinkrl/trainer/checkpoint.py: Checkpointer) ----

    def save_beside(self, run_dir: Path, name: str) -> None:
        self.save(critic_path(run_dir, name), with_optimizer=name != "final")

    def load_beside(self, run_dir: Path, path: Path) -> None:
        cpath = critic_path(run_dir, path.name)
        if not cpath.is_file():
            raise ConfigError(f"{path} has no critic checkpoint ({cpath}); cannot resume a gae run")
        self.load_state_dict(torch.load(cpath, weights_only=True, map_location="cpu"))

    def prune_beside(self, run_dir: Path, keep: set[str]) -> None:
        prune_critic(run_dir, keep)


def _full_mask(mbs: list[MicroBatch], like: Tensor) -> Tensor:
    return fill_rows(mbs, *like.shape, lambda mb: mb.mask)  # [N, T]


def value_stats(values: Tensor, returns: Tensor, mask: Tensor) -> dict:
    """Mean value and explained variance 1 - Var(R - V) / Var(R) over real tokens (1 is a perfect critic)."""
    n = mask.sum().clamp(min=1)
    mean_r = (returns * mask).sum() / n
    var_r = (((returns - mean_r) * mask) ** 2).sum() / n
    resid = (returns - values) * mask
    var_res = ((resid - resid.sum() / n) * mask).pow(2).sum() / n
    ev = 1.0 - float(var_res / var_r) if float(var_r) > 0 else float("nan")
    return {"value_mean": float((values * mask).sum() / n), "vf_explained_var": ev}


def critic_path(run_dir: Path, name: str) -> Path:
    """``name`` is ``step-N`` or ``final``, as for the policy's checkpoint folders."""
    return Path(run_dir) / "critic" / f"{name}.pt"


def prune_critic(run_dir: Path, keep: set[str]) -> None:
    """Delete critic step checkpoints whose policy checkpoint is gone (``final.pt`` stays)."""
    folder = Path(run_dir) / "critic"
    if not folder.is_dir():
        return
    for f in folder.glob("step-*.pt"):
        if f.stem not in keep:
            f.unlink()
