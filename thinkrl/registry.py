"""A small name -> function registry, so that configs select algorithms and rewards by name."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            if name in self._items:
                raise KeyError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = fn
            return fn

        return deco

    def check(self, name: str) -> None:
        if name not in self._items:
            from thinkrl.config import ConfigError

            raise ConfigError(f"unknown {self.kind} '{name}'; choose from: {', '.join(sorted(self._items))}")

    def get(self, name: str) -> F:
        self.check(name)
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
