"""What every config section is built on: `Section`, `ConfigError` and `_require`."""

from __future__ import annotations

import dataclasses


class ConfigError(ValueError):
  """A run configuration that cannot be used; the message is one line naming the key."""


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


@dataclasses.dataclass(frozen=True)
class Section:
  """Base of every config section: a frozen dataclass with a per-section `validate`."""

  def validate(self, prefix: str) -> None:
    """Raises `ConfigError` for an impossible value; `prefix` is the section's dotted key
    with a trailing dot (e.g. "optim."), for messages."""
