"""Errors of the training layer that the command line reports in one line (importing this
module imports nothing else, so the CLI can name them without loading JAX)."""


class TrainingError(RuntimeError):
  """The run cannot go on (e.g. too many non-finite steps); the message says what to do."""
