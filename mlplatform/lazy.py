"""Modules imported on first use: loading the code location (one slice of the graph per data set) must not pay
for polars, numpy or requests, which only the runs, sensors and tools use.

`pl = lazy_import("polars")` binds a stand-in whose first attribute read imports the real module (a plain import:
every `import polars` elsewhere gets the same module) and forwards to it from then on. The stand-in is not a
module and is never put in `sys.modules`, so nothing that walks `sys.modules` (`inspect.getmodule`, pydantic's
docstring extraction) imports it by accident. A module using it touches no attribute of it at import time:
annotations naming its types are strings.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any


class _Lazy:
    __slots__ = ("_name", "_module")

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_module", sys.modules.get(name))

    def _load(self):
        module = self._module
        if module is None:
            module = importlib.import_module(self._name)
            object.__setattr__(self, "_module", module)
        return module

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._load(), attr)

    def __dir__(self):
        return dir(self._load())

    def __repr__(self) -> str:
        state = "loaded" if self._module is not None else "not loaded yet"
        return f"<lazy module {self._name!r} ({state})>"


def lazy_import(name: str) -> Any:
    """`name`, imported when one of its attributes is first read."""
    return _Lazy(name)


__all__ = ["lazy_import"]
