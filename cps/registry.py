"""A name -> class registry filled by a decorator (`@METHODS.register("wanda")`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict[str, type[T]], Generic[T]):
    """Classes by name; registering sets the class's `name` to its key (the module's name)."""

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def decorate(cls: type[T]) -> type[T]:
            cls.name = name  # type: ignore[attr-defined]
            self[name] = cls
            return cls

        return decorate
