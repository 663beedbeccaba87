"""User code named in a config: `module:function` or `path/to/file.py:function`."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable

from jaxpost.config.sections_base import ConfigError


def import_function(spec: str, *, key: str) -> tuple[str, Callable]:
  """(the function's name, the function) of `module:function` or `path/to/file.py:function`
  (a file is imported once per resolved path). `key` is the config key named in errors."""
  target, _, attr = spec.rpartition(":")
  if not target or not attr:
    raise ConfigError(f"{key}: {spec!r} should be module:function or "
                      "path/to/file.py:function")
  where = f"{key}: {spec!r}"
  if target.endswith(".py") or "/" in target or "\\" in target:
    path = Path(target).expanduser()
    if not path.is_file():
      raise ConfigError(f"{where}: no file {path}")
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:8]
    name = f"_jaxpost_user_{resolved.stem}_{digest}"
    module = sys.modules.get(name)
    if module is None:
      module_spec = importlib.util.spec_from_file_location(name, resolved)
      if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"{where}: {path} cannot be imported as a Python module")
      module = importlib.util.module_from_spec(module_spec)
      sys.modules[name] = module  # so its classes pickle and dataclasses resolve
      try:
        module_spec.loader.exec_module(module)
      except Exception as e:  # pylint: disable=broad-except
        del sys.modules[name]
        raise ConfigError(f"{where}: importing {path} failed: {type(e).__name__}: {e}") from e
  else:
    try:
      module = importlib.import_module(target)
    except ModuleNotFoundError as e:
      if e.name is not None and (target == e.name or target.startswith(e.name + ".")):
        raise ConfigError(f"{where}: no module named {e.name!r} (install it or put its folder on "
                          "PYTHONPATH; a file path, path/to/rewards.py:function, also works)"
                          ) from None
      raise ConfigError(f"{where}: importing {target} failed: {type(e).__name__}: {e}") from e
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(f"{where}: importing {target} failed: {type(e).__name__}: {e}") from e
  fn: Any = module
  for part in attr.split("."):
    if not hasattr(fn, part):
      raise ConfigError(f"{where}: {target} has no attribute {attr!r}")
    fn = getattr(fn, part)
  if not callable(fn):
    raise ConfigError(f"{where}: {target}.{attr} is a {type(fn).__name__}, not a function")
  return attr.rsplit(".", 1)[-1], fn
