"""Lazy re-exports for the subpackages (PEP 562).

Each subpackage maps its public names to the submodule that defines them, so that
``import lightning_tiger.optim`` stays cheap and one missing optional dependency of one submodule never breaks
the import of its siblings. ``jsonargparse`` / LightningCLI resolve
``class_path: lightning_tiger.optim.Tiger`` through the module ``__getattr__`` like any attribute.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Build the ``__getattr__`` / ``__dir__`` pair of a package.

    Args:
        package: the package's ``__name__``.
        exports: public name -> relative submodule (e.g. ``{"Tiger": ".tiger"}``).

    Returns:
        ``(__getattr__, __dir__)`` to assign at module level.
    """
    module = importlib.import_module(package)

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name], package), name)
            setattr(module, name, value)  # cache: later lookups skip __getattr__
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(exports) | set(vars(module)))

    return __getattr__, __dir__
