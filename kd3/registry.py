"""A small name → constructor registry (torchdistill-style), strict about duplicates and misses."""

from __future__ import annotations

import difflib
from typing import Generic, Iterator, TypeVar

from kd3.errors import Kd3Error

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to callables. Registering a name twice raises; a miss lists close matches."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._docs: dict[str, str] = {}

    def register(self, name: str, obj: T | None = None, *, doc: str | None = None):
        """Register ``obj`` under ``name``; usable as ``@registry.register("name")``."""

        def add(target: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = target
            summary = doc if doc is not None else (getattr(target, "__doc__", None) or "")
            self._docs[name] = summary.strip().splitlines()[0] if summary.strip() else ""
            return target

        return add(obj) if obj is not None else add

    def unregister(self, name: str) -> None:
        """Remove ``name`` (e.g. an entry a test registered for itself)."""
        if name not in self._entries:
            raise KeyError(f"{self.kind} {name!r} is not registered")
        del self._entries[name]
        del self._docs[name]

    def get(self, name: str) -> T:
        if name in self._entries:
            return self._entries[name]
        close = difflib.get_close_matches(name, list(self._entries), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(self._entries))}"
        raise Kd3Error(f"unknown {self.kind} {name!r}{hint}")

    def describe(self, name: str) -> str:
        return self._docs.get(name, "")

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
