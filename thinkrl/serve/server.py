"""``thinkrl serve model=PATH host=H port=P``: load the model, build the batching decoder,
run the FastAPI app under uvicorn.

The fast engine's :class:`~thinkrl.rollout.slots.SlotDecoder` batches concurrent requests
(continuous batching); a model that engine cannot run exactly
(``thinkrl.rollout.fast.unsupported``) is served by the one-slot ``HFSlotDecoder`` instead,
one request at a time, with one log line saying why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from thinkrl.config import ConfigError

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    model: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    served_name: str = ""  # the model id clients send; default: the model argument
    max_slots: int = 32  # sequences decoded together
    max_queue: int = 256  # requests waiting for a slot before new ones get HTTP 429
    max_len: int = 0  # context positions per slot (prompt + reply); 0: the model's, capped at 4096
    max_tokens: int = 512  # reply length when a chat request gives no max_tokens
    backend: str = "fast"  # fast | hf (hf: one request at a time)
    dtype: str = "auto"  # auto | bf16 | fp32
    log_level: str = "warning"  # uvicorn's access log level

    def validate(self) -> None:
        if not self.model:
            raise ConfigError(
                "thinkrl serve needs model=PATH (a built-in name, an HF folder or a .gguf file)"
            )
        if self.backend not in ("fast", "hf"):
            raise ConfigError(f"backend '{self.backend}' unknown; choose from: fast, hf")
        for key in ("max_slots", "max_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.max_queue < 0 or self.max_len < 0:
            raise ConfigError("max_queue and max_len must be >= 0")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be 1..65535, got {self.port}")


def build_decoder(model, tok, cfg: ServeConfig):
    """The continuous-batching decoder, or the serial fallback (one log line)."""
    from thinkrl.device import use_bf16
    from thinkrl.rollout.fast import unsupported
    from thinkrl.rollout.slots import HFSlotDecoder, SlotDecoder

    limit = getattr(model.config, "max_position_embeddings", 4096) or 4096
    max_len = cfg.max_len or min(limit, 4096)
    why = "backend=hf" if cfg.backend == "hf" else unsupported(model.config)
    if why is None:
        return SlotDecoder(model, tok, max_slots=cfg.max_slots, max_len=max_len, bf16=use_bf16(cfg.dtype))
    log.warning("serving without continuous batching (%s): one request at a time on the hf engine", why)
    return HFSlotDecoder(model, tok, max_len=max_len)


def build_backend(cfg: ServeConfig):
    from thinkrl.models import load_model
    from thinkrl.serve.api import Backend
    from thinkrl.serve.scheduler import Scheduler

    model, tok = load_model(cfg.model)
    dec = build_decoder(model, tok, cfg)
    sched = Scheduler(dec, tok, max_queue=cfg.max_queue).start()
    return Backend(sched, tok, cfg.served_name or cfg.model, dec.max_len, default_max_tokens=cfg.max_tokens)


def _check_port(host: str, port: int) -> None:
    """Fail before the model loads if the address cannot be bound."""
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise ConfigError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); choose another port= or host="
        ) from None


def serve(cfg: ServeConfig) -> None:
    import uvicorn

    from thinkrl.serve.api import create_app

    _check_port(cfg.host, cfg.port)
    backend = build_backend(cfg)
    app = create_app(backend)
    print(
        f"thinkrl serve: {backend.name} on http://{cfg.host}:{cfg.port}/v1 "
        f"({backend.sched.dec.max_slots} slots, context {backend.max_len})",
        flush=True,
    )
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    finally:
        backend.sched.stop()
