"""Name -> constructor registries for the swappable parts of mmclip.

Every built-in part registers itself with a decorator where its class is defined::

    @IMAGE_TOWERS.register("clip_vit", aliases=("vit",))
    class ClipVisionTransformer(nn.Module): ...

and is built by name from a spec dict, ``IMAGE_TOWERS.build({"name": "clip_vit", "width": 64})``.
This module uses the standard library only.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

__all__ = ["Registry", "IMAGE_TOWERS", "TEXT_TOWERS", "POOLERS", "LOSSES"]

T = TypeVar("T", bound=Callable[..., Any])


class Registry(Generic[T]):
    """A typed mapping from names (and aliases) to constructors.

    Args:
        kind: what the registry holds, used in error messages ("image tower").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str | None = None, *, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        """Decorator that registers a class or factory under ``name`` (default: its ``__name__``)."""

        def decorator(obj: T) -> T:
            self.add(name or obj.__name__, obj, aliases=aliases)
            return obj

        return decorator

    def add(self, name: str, obj: T, *, aliases: tuple[str, ...] = ()) -> None:
        """Registers ``obj`` under ``name`` and ``aliases``; any name already taken raises ValueError."""
        for key in (name, *aliases):
            if key in self._entries or key in self._aliases:
                raise ValueError(f"{self.kind} {key!r} is already registered ({self._resolve(key)!r})")
        self._entries[name] = obj
        for alias in aliases:
            self._aliases[alias] = name

    def _resolve(self, name: str) -> str:
        return self._aliases.get(name, name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._resolve(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> T:
        """Returns the constructor registered as ``name`` or one of its aliases.

        Raises:
            KeyError: unknown name; the message lists the known names and the closest match.
        """
        key = self._resolve(name)
        if key not in self._entries:
            known = sorted([*self._entries, *self._aliases])
            close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise KeyError(f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(known)}")
        return self._entries[key]

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names (not aliases) matching a shell-style ``pattern``, sorted."""
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def build(self, spec: str | Mapping[str, Any], **overrides: Any) -> Any:
        """Builds an object from ``"name"`` or ``{"name": ..., **kwargs}``; ``overrides`` win."""
        if isinstance(spec, str):
            name, kwargs = spec, {}
        else:
            if "name" not in spec:
                raise KeyError(f"a {self.kind} spec needs a 'name' key, got keys {sorted(spec)}")
            kwargs = {k: v for k, v in spec.items() if k != "name"}
            name = spec["name"]
        return self.get(name)(**{**kwargs, **overrides})

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


IMAGE_TOWERS: Registry[Callable[..., Any]] = Registry("image tower")
TEXT_TOWERS: Registry[Callable[..., Any]] = Registry("text tower")
POOLERS: Registry[Callable[..., Any]] = Registry("pooler")
LOSSES: Registry[Callable[..., Any]] = Registry("loss")
