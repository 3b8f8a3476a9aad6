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


def settings_from(settings_cls: type, yaml_defaults: dict, raw: dict, kind: str, name: str):
    """The settings dataclass of ``kind`` ``name``: its schema, its YAML's defaults, then ``raw`` on top.

    A wrong type or an unknown key is one FtuneError paragraph listing the settings it accepts."""
    import dataclasses

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from ftune.errors import FtuneError

    try:
        merged = OmegaConf.merge(OmegaConf.structured(settings_cls), yaml_defaults, raw)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        known = ", ".join(f.name for f in dataclasses.fields(settings_cls))
        raise FtuneError(
            f"Invalid setting for {kind} '{name}': {e.msg if hasattr(e, 'msg') else e}. "
            f"The settings this {kind} accepts are: {known}."
        ) from None
