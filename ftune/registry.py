"""Name -> class registries (methods, strategies): one decorator shape for both."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T", bound=type)


def registrar(table: dict[str, T], kind: str) -> Callable[..., Callable[[T], T]]:
    """``@register(*names)``: a class decorator that files the class in ``table`` under each name."""

    def register(*names: str) -> Callable[[T], T]:
        def wrap(cls: T) -> T:
            for name in names:
                if name in table:
                    raise ValueError(f"{kind} name {name!r} registered twice")
                table[name] = cls
            return cls

        return wrap

    return register
