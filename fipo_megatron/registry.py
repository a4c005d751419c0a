"""The one registry type behind every extension point: policy losses, advantage estimators and rewards
(``algo/``), rollout engines (``rollout/base.py``) and checkpoint mappings (``checkpoint/registry.py``).

    _LOSSES: Registry[LossFn] = Registry("policy loss")
    @_LOSSES.register("fipo")
    def fipo_policy_loss(...): ...
    _LOSSES.get("fipo")          # UnknownNameError listing the known names for anything else

A name maps to one object (a function or a factory); registering a different object under a taken name is
an error, registering the same one again is not (a module imported twice). ``metadata`` keeps what a
registry needs beside the object (an engine's replica arguments, a reward's failure score).
"""

from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

F = TypeVar("F", bound=Callable)


class UnknownNameError(KeyError, ValueError):
    """An unregistered name. Both a ``KeyError`` (a failed look-up) and a ``ValueError`` (user error)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class Registry(Generic[F]):
    """Functions registered under unique names; ``kind`` names the registry in error messages."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, F] = {}
        self._metadata: dict[str, Any] = {}

    def register(self, name: str, *, metadata: Any = None) -> Callable[[F], F]:
        """Decorator registering ``fn`` under ``name`` (with ``metadata``, see ``metadata``); a second,
        different function for a name is an error."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def decorator(fn: F) -> F:
            if self._items.get(name, fn) is not fn:
                raise ValueError(f"{self.kind} {name!r} is already registered (to {self._items[name].__qualname__})")
            self._items[name] = fn
            self._metadata[name] = metadata
            return fn

        return decorator

    def get(self, name: str) -> F:
        """The object registered under ``name``; ``UnknownNameError`` listing the known names otherwise."""
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {sorted(self._items)}") from None

    def metadata(self, name: str) -> Any:
        """What was registered with ``name`` besides the object (None when nothing was)."""
        self.get(name)
        return self._metadata[name]

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
