"""Named registries with dotted snake_case keys (``lrp.epsilon``, ``prune.relevance``).

A duplicate key is an error at import time; an unknown key is a ``ConfigError`` that lists the
known ones.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, Generic, Iterator, TypeVar

from toolchain.errors import ConfigError

T = TypeVar("T")
_KEY = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9][a-z0-9_]*)*$")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, T] = {}

    def register(self, key: str, item: T | None = None):
        """Register ``item`` under ``key``; without ``item``, return a decorator."""
        if not _KEY.match(key):
            raise ValueError(f"{self.kind} key {key!r} is not dotted snake_case")

        def add(obj: T) -> T:
            if key in self._items:
                raise ValueError(f"duplicate {self.kind} key {key!r}")
            self._items[key] = obj
            return obj

        return add(item) if item is not None else add

    def get(self, key: str) -> T:
        try:
            return self._items[key]
        except KeyError:
            known = ", ".join(sorted(self._items))
            raise ConfigError(f"unknown {self.kind} {key!r}; known: {known}") from None

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def keys(self):
        return sorted(self._items)
