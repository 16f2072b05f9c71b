"""Experiment tracking: every step's metrics to ``metrics.jsonl``, and to the trackers named in
``log.backends``.

``jsonl`` is always on, and is the run's record: resume, reports and plots read it. The others
are optional extras, imported only when named, and each is one clear error when its package is
missing:

- ``tensorboard`` (``pip install 'thinkrl[tensorboard]'``) writes event files to ``RUN/tensorboard``;
- ``wandb`` (``pip install 'thinkrl[wandb]'``), to the project ``log.project``, with the resolved
  config;
- ``trackio`` (``pip install 'thinkrl[trackio]'``), Hugging Face's local-first tracker with the
  wandb API, to the same project.

Only numbers are sent to the trackers: strings and lists stay in the JSONL record.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from thinkrl.config import ConfigError

BACKENDS = ("jsonl", "tensorboard", "wandb", "trackio")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def _require(backend: str):
    try:
        return importlib.import_module(_PACKAGES[backend])
    except ImportError:
        raise ConfigError(
            f"log.backends: '{backend}' needs the {_PACKAGES[backend]} package; "
            f"install it with: pip install 'thinkrl[{backend}]'"
        ) from None


def check_backends(backends: list) -> None:
    """Known names, and the package of each one installed (checked with the config, before any
    model loads)."""
    for b in backends:
        if b not in BACKENDS:
            raise ConfigError(f"log.backends: '{b}' unknown; choose from: {', '.join(BACKENDS)}")
        if b != "jsonl":
            _require(b)


class Trackers:
    """The trackers other than jsonl, started once per run (``backends`` from ``log.backends``)."""

    def __init__(self, backends: list, run_dir: Path, project: str, config: dict, run_name: str):
        check_backends(backends)
        self.sinks = []
        for b in backends:
            if b == "jsonl":
                continue
            mod = _require(b)
            if b == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
                self.sinks.append(
                    (lambda m, s, w=writer: [w.add_scalar(k, v, s) for k, v in m.items()], writer.close)
                )
            else:  # wandb and trackio share the init / log / finish API
                run = mod.init(
                    project=project,
                    name=run_name,
                    config=config,
                    **({"dir": str(run_dir)} if b == "wandb" else {}),
                )
                self.sinks.append((lambda m, s, r=run: r.log(m, step=s), run.finish))

    def log(self, metrics: dict, step: int) -> None:
        numbers = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
        }
        for log_fn, _ in self.sinks:
            log_fn(numbers, step)

    def close(self) -> None:
        for _, close in self.sinks:
            close()
        self.sinks = []
