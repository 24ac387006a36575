"""The method registry: the one place that names methods.

``methods.get(name)`` returns the module of a method (``make_method`` for training, ``load_generator``
for inference; see :mod:`sr_jax.methods.base`). ``config.method`` is a registered name, or the dotted
module path of a method that lives outside this package (a plugin: any importable module defining both
functions), e.g. ``--config.method=my_project.my_method``.
"""
from __future__ import annotations

import importlib
import types

# The contracts, re-exported: shared code says ``methods.Method`` and never imports a method module.
from sr_jax.methods.base import Generator, LatentStage, Method  # noqa: F401

# name -> module path. Adding a method = one line here + its module + its config.
_REGISTRY: dict[str, str] = {
    'omgsr': 'sr_jax.methods.omgsr',
    'tudsr': 'sr_jax.methods.tudsr',
}
REQUIRED_FUNCTIONS = ('make_method', 'load_generator')


class UnknownMethodError(ValueError):
  """``config.method`` names no registered method and no importable method module."""


def names() -> tuple[str, ...]:
  """The registered method names, sorted."""
  return tuple(sorted(_REGISTRY))


def register(name: str, module_path: str) -> None:
  """Registers ``name`` for the method module at ``module_path`` (e.g. from a plugin package)."""
  if name in _REGISTRY and _REGISTRY[name] != module_path:
    raise ValueError(f'method {name!r} is already registered as {_REGISTRY[name]}')
  _REGISTRY[name] = module_path


def get(name: str) -> types.ModuleType:
  """The method module for ``name`` (a registered name or a dotted module path).

  Raises:
    UnknownMethodError: listing the known methods, when ``name`` is neither; or naming the missing
      functions when the module is not a method module.
  """
  if name in _REGISTRY:
    path = _REGISTRY[name]
  elif isinstance(name, str) and '.' in name:
    path = name
  else:
    raise UnknownMethodError(
        f'unknown method {name!r}; known methods: {", ".join(names())} (or the dotted module path '
        f'of a method module defining {" and ".join(REQUIRED_FUNCTIONS)})')
  try:
    module = importlib.import_module(path)
  except ModuleNotFoundError as e:
    if e.name is not None and path.startswith(e.name):  # the method module itself is missing
      raise UnknownMethodError(f'method {name!r}: cannot import {path} ({e}); known methods: '
                               f'{", ".join(names())}') from None
    raise
  missing = [f for f in REQUIRED_FUNCTIONS if not callable(getattr(module, f, None))]
  if missing:
    raise UnknownMethodError(f'{path} is not a method module: it lacks {", ".join(missing)}')
  return module
