"""Registries of classes by name ("module:Class"), each imported only when it is used."""
import importlib
from typing import Mapping


def lookup(registry: Mapping[str, str], name: str | None, field: str, kind: str, *,
           own: bool = False) -> type:
  """The class that `registry` gives `name` ("package.module:Class"), imported now.

  With `own`, a name that is itself "package.module:Class" (a class of one's own) is
  taken as it is. Anything else raises a ValueError naming `config.<field>` and the
  known names, e.g. "config.task='clasify': known tasks are 'classify', ...".
  """
  spec = registry.get(name) if name is not None else None
  if spec is None and own and ":" in (name or ""):
    spec = name
  if spec is None:
    known = ", ".join(repr(k) for k in sorted(registry))
    raise ValueError(f"config.{field}={name!r}: known {kind} are {known}"
                     + (", or give 'package.module:Class'." if own else "."))
  module, _, cls_name = spec.partition(":")
  return getattr(importlib.import_module(module), cls_name)
