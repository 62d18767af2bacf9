"""Plug-in registries: models, datasets, metrics, knobs and analyses register by decorator.

An unknown name fails with the list of what is available, e.g.
``Unknown model 'x'. Available: flexmoe, simulated``.

Three ways in, none of which needs an edit of this package:

* a decorator, ``@register_model("name")``, run when the defining module is imported;
* a lazy name, ``REGISTRY.register_lazy("name", "package.module:Object")``: the module is imported
  on the first ``get`` of that name, so listing names imports nothing heavy;
* an entry point in the registry's group (``flexvlm_ray.models``, ``flexvlm_ray.datasets``, ...),
  declared by another installed package: ``name = package.module:Object``.

A registry built with ``base=`` checks what it loads (a subclass, or an instance, of ``base``).
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar

T = TypeVar("T")


class UnknownName(KeyError):
    """A name that no plug-in registered."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class PluginError(ValueError):
    """A lazy name or entry point that does not load, or loads the wrong kind of object."""


def load_object(target: str) -> Any:
    """``package.module:Object`` (or ``package.module:Object.attr``) -> the object."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise PluginError(f"{target!r} is not of the form 'package.module:Object'")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PluginError(f"{target!r}: module {module_name!r} has no {attr!r}") from None
    return obj


class Registry(Generic[T]):
    def __init__(self, kind: str, *, group: Optional[str] = None, base: Optional[type] = None) -> None:
        self.kind = kind
        self.group = group
        self.base = base
        self._items: dict[str, T] = {}
        self._lazy: dict[str, str] = {}
        self._entry_points_read = group is None

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._check(name, obj)
            self._items[name] = obj
            self._lazy.pop(name, None)
            return obj

        return decorator

    def register_lazy(self, name: str, target: str) -> None:
        """Register ``name`` as ``package.module:Object``, imported on its first ``get``."""
        if name in self._items or (name in self._lazy and self._lazy[name] != target):
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._lazy[name] = target

    def get(self, name: str) -> T:
        self._read_entry_points()
        if name in self._lazy and name not in self._items:
            target = self._lazy[name]
            obj = load_object(target)  # importing the module may register it by decorator
            if name not in self._items:
                self.register(name)(obj)
        try:
            return self._items[name]
        except KeyError:
            raise UnknownName(
                f"Unknown {self.kind} '{name}'. Available: {', '.join(self.names()) or '(none)'}"
            ) from None

    def target(self, name: str) -> str:
        """Where ``name`` comes from: ``module:Object``, without importing it."""
        self._read_entry_points()
        if name in self._lazy:
            return self._lazy[name]
        obj = self.get(name)
        return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', type(obj).__qualname__)}"

    def names(self) -> list[str]:
        self._read_entry_points()
        return sorted({*self._items, *self._lazy})

    def __contains__(self, name: object) -> bool:
        self._read_entry_points()
        return name in self._items or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def _check(self, name: str, obj: Any) -> None:
        if self.base is None:
            return
        ok = issubclass(obj, self.base) if isinstance(obj, type) else isinstance(obj, self.base)
        if not ok:
            raise PluginError(f"{self.kind} '{name}': {obj!r} is not a {self.base.__name__}")

    def _read_entry_points(self) -> None:
        if self._entry_points_read:
            return
        self._entry_points_read = True
        for ep in entry_points(group=self.group):
            if ep.name not in self._items and ep.name not in self._lazy:
                self._lazy[ep.name] = ep.value
