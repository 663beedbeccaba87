"""`DataError`: a bad data row, named by file, 1-based row number and field.

Errors are raised where the problem is found (a JSON parser knows the line, a format checker
knows the field) and completed where the row's origin is known: `formats.tokenize_rows` adds
"file row N" to a `DataError` raised by a row checker that only saw the row. `reason` is a short
fixed key ("missing_field", "wrong_type", "empty", "invalid_json", ...) so that
`on_bad_row="skip"` can count skipped rows by cause.
"""

from __future__ import annotations

# Reasons, the keys of the skipped-rows counters.
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY = "empty"
INVALID_JSON = "invalid_json"
NO_TARGET = "no_trainable_tokens"
TEMPLATE = "chat_template"
ENCODING = "encoding"
# Reasons of errors about a whole file or data set, never skipped by `on_bad_row="skip"`.
NO_ROWS = "no_rows"
UNKNOWN_FORMAT = "unknown_format"
UNREADABLE = "unreadable_file"


class DataError(ValueError):
  """A data row that cannot be used, e.g. `data/train.jsonl row 17: field 'completion' is empty`.

  Attributes:
    reason: a short key saying what is wrong (the module constants above).
    detail: the message without the location.
    where: "file row N" (1-based: the file's line number for JSON lines, the data row for
      csv/parquet/json arrays), "file line N" where only the line is known (a non-UTF-8 byte
      in a csv or JSON array file), the file itself for an error about the whole file, or
      None while unknown.
    field: the offending field (e.g. "completion", "messages[2].role"), or None.
  """

  def __init__(self, reason: str, detail: str, *, where: str | None = None,
               field: str | None = None) -> None:
    self.reason = reason
    self.detail = detail
    self.where = where
    self.field = field
    super().__init__(f"{where}: {detail}" if where else detail)

  def at(self, where: str) -> DataError:
    """This error located at `where` (unchanged if it already has a location)."""
    if self.where is not None:
      return self
    return DataError(self.reason, self.detail, where=where, field=self.field)


def field_error(reason: str, field: str, problem: str) -> DataError:
  """A `DataError` about one field: "field 'name' <problem>"."""
  return DataError(reason, f"field '{field}' {problem}", field=field)
