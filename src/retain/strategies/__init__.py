"""Continual-learning methods, one module each, registered by name.

Every module in this package is imported on first use, so a new method is one new file
with a ``@register``-ed class. Third-party packages can add strategies through the
``retain.strategies`` entry-point group.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

from retain.strategies.base import (
    Context, Strategy, StrategyStack, option_models, parse_strategy, register, registry,
)

__all__ = [
    "Context", "Strategy", "StrategyStack", "option_models", "parse_strategy", "register", "registry",
]

_DISCOVERED = False


def discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base" and not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")
    for ep in entry_points(group="retain.strategies"):
        ep.load()
