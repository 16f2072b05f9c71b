"""Numerical guards: an update computed from a non-finite reward, loss or gradient norm
is skipped, not applied, and too many skips in a row stop the run.

One NaN in an AdamW step poisons every weight it touches, and every later step with
them; the run then trains on garbage until someone looks at the curves. So each
trainer asks :func:`skip_cause` before ``optimizer.step()``: on a cause it zeroes the
gradients and leaves the weights, the optimizer state and the LR schedule as they
were. A skip is logged in ``metrics.jsonl`` (``skipped: 1`` and ``skip_cause``, with a
running ``skipped_total``). ``optim.max_bad_steps`` skips in a row end the run with one
message (:class:`TrainingError`) before anything more is saved, so the last checkpoint
written, which holds finite weights (:func:`thinkrl.trainer.checkpoint.check_finite`),
stays the last good one.
"""

from __future__ import annotations

import math

from thinkrl.config import ConfigError

# The causes, in the order they are checked: a NaN reward makes a NaN loss, which makes a NaN norm.
SKIP_CAUSES = ("nan_reward", "nan_loss", "nan_grad_norm")
ADVICE = {
    "nan_reward": "a reward returned NaN or infinity: fix that reward",
    "nan_loss": "the loss is not finite: lower optim.lr or check the advantages' inputs",
    "nan_grad_norm": "the gradient norm is not finite: lower optim.lr",
}


class TrainingError(ConfigError):
    """A run that cannot go on for a reason a user fixes in the config or the rewards;
    printed as one line, like any ConfigError."""


def skip_cause(loss: float, grad_norm: float) -> str | None:
    """Why an update with this loss and pre-clip gradient norm must not be applied, or None."""
    if not math.isfinite(loss):
        return "nan_loss"
    if not math.isfinite(grad_norm):
        return "nan_grad_norm"
    return None


class BadStepGuard:
    """Counts skipped updates across a run (and a resume) and stops the run after
    ``max_bad_steps`` in a row."""

    def __init__(self, max_bad_steps: int):
        self.max_bad_steps = max_bad_steps
        self.total = 0  # skipped steps in the whole run
        self.streak: list[tuple[int, str]] = []  # (step, cause) of the current run of skips

    def record(self, step: int, metrics: dict) -> None:
        """Add ``skipped`` and ``skipped_total`` to a step's metrics (``skip_cause`` is set
        by whoever skipped)."""
        cause = metrics.get("skip_cause")
        if cause is None:
            self.streak = []
        else:
            self.total += 1
            self.streak.append((step, cause))
        metrics["skipped"] = int(cause is not None)
        metrics["skipped_total"] = self.total

    @property
    def exhausted(self) -> bool:
        """True once ``max_bad_steps`` updates in a row were skipped: the run must stop."""
        return len(self.streak) >= self.max_bad_steps

    def error(self, last_good) -> TrainingError:
        """The one message that ends the run; ``last_good`` is the newest checkpoint, or None."""
        steps = ", ".join(f"step {s}: {c}" for s, c in self.streak)
        advice = "; ".join(dict.fromkeys(ADVICE[c] for _, c in self.streak))
        kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
        return TrainingError(
            f"training stopped after {len(self.streak)} skipped updates in a row ({steps}; "
            f"optim.max_bad_steps={self.max_bad_steps}): {advice}; {kept}"
        )

    def state_dict(self) -> dict:
        return {"total": self.total, "streak": [list(x) for x in self.streak]}

    def load_state_dict(self, s: dict) -> None:
        self.total = int(s.get("total", 0))
        self.streak = [(int(step), str(cause)) for step, cause in s.get("streak", [])]
