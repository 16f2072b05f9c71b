"""Name -> component registries, so that configs select algorithms, rewards, tasks and engines by name.

A component declares what the rest of the code needs to know about it where it is
registered, as keyword traits, for example::

    @ADVANTAGES.register("gae", loss_agg="token_mean", kl_in="reward", needs=("values",))

The trainer and the config check then ask the registry (``ADVANTAGES.trait("gae", "needs")``,
``ADVANTAGES.names(kl_in="reward")``) instead of keeping tables of names beside it, so a new
component is one registered function and its test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from thinkrl.errors import ConfigError

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, F] = {}
        self._traits: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **traits) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            if name in self._items:
                raise KeyError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = fn
            self._traits[name] = traits
            return fn

        return deco

    def check(self, name: str) -> None:
        if name not in self._items:
            raise ConfigError(f"unknown {self.kind} '{name}'; choose from: {', '.join(sorted(self._items))}")

    def get(self, name: str) -> F:
        self.check(name)
        return self._items[name]

    def trait(self, name: str, key: str, default: Any = None) -> Any:
        """What component ``name`` declared as ``key`` when it was registered, else ``default``."""
        self.check(name)
        return self._traits[name].get(key, default)

    def names(self, **match) -> list[str]:
        """The registered names, sorted; with ``match``, only those whose traits have those values."""
        return sorted(n for n in self._items if all(self._traits[n].get(k) == v for k, v in match.items()))

    def __contains__(self, name: str) -> bool:
        return name in self._items
