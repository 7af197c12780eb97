"""The rag extra's packages, imported when first needed (the core never imports an extra at module level)."""
from __future__ import annotations

import importlib
from types import ModuleType


def need(module: str) -> ModuleType:
  """`module` imported, or a one-line error saying how to install the rag extra."""
  try: return importlib.import_module(module)
  except ImportError:
    raise ValueError(f"retrieval needs the {module!r} package: pip install 'tinyllama2[rag]'") from None
