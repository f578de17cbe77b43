"""Name → class registries of the strategies (parameterisations, variances, losses, weightings).

A strategy base class calls :func:`register` from ``__init_subclass__``, so defining a subclass
with a ``name`` is all it takes to make it selectable by that name (and so from a one-line YAML).
Pass ``register=False`` in the class statement for internal wrappers.
"""

from __future__ import annotations

from typing import Any

__all__ = ["register"]


def register(registry: dict[str, Any], kind: str, cls: type) -> None:
    """Add ``cls`` to ``registry`` under ``cls.name``.

    Raises:
        TypeError: when ``cls`` has no ``name`` of its own, or the name is taken.
    """
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name:
        raise TypeError(
            f"{cls.__name__} needs a class attribute `name` (its {kind} name), or pass "
            "register=False in the class statement"
        )
    if name in registry:
        raise TypeError(
            f"{kind} name {name!r} of {cls.__name__} is taken by {registry[name].__name__}; "
            "choose another name, or pass register=False"
        )
    registry[name] = cls
