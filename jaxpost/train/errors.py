"""The training layer's error."""


class TrainingError(RuntimeError):
  """The run cannot go on (e.g. too many non-finite steps); the message says what to do."""
