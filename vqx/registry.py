"""Name -> implementation tables for the pluggable stages (algorithm steps, exporters, evaluators, loggers)."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from .errors import UserError

T = TypeVar("T")


class Registry(dict, Generic[T]):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self[name] = obj
            return obj

        return deco

    def lookup(self, name: str) -> T:
        if name not in self:
            raise UserError(f"{self.kind} {name!r} is unknown; valid: {', '.join(sorted(self))}")
        return self[name]
