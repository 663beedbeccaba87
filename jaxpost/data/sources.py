"""Reading data rows: local JSON lines / JSON / parquet / csv files, a folder of them, or a hub
dataset, each row with its origin ("file row N") so that a bad row can be named.

Two entry points:

* `load_rows(path_or_name, split=...) -> datasets.Dataset`, for callers that want a Dataset.
* `read_rows(source, split=...) -> list[Row]`, what the pipeline uses: every row as a plain dict
  with its origin, or the `DataError` that made it unreadable (an invalid JSON line), so that
  `on_bad_row="skip"` can skip it and carry on.

JSON and JSON lines are parsed here, line by line with `json.loads`, not by datasets' loader:
datasets reports an invalid line without a usable line number, and it infers one Arrow schema
for the whole file, so a single row of the wrong type (`"messages": "hi"` among lists) fails
the whole file with an error that names neither row nor field. Parsed here, such a row reaches
the format checker, which names the row and the field. Parquet and csv are typed columns already
and are read with `datasets.load_dataset`, one file at a time so that row numbers are per file.

Row numbers are 1-based: the line number in the file for JSON lines (blank lines are skipped
but counted), the element index + 1 for a JSON array, the data row (header excluded) for csv and
parquet. Local files (all of a folder's together) form the "train" split, which `split` may
slice ("train[:100]", "train[10%:]"); a name that is not a local path is passed to
`datasets.load_dataset(name, split=split)` as a hub dataset (not tested: offline).

Data files must be UTF-8 (a leading byte-order mark is allowed). A JSON lines row that is not
UTF-8 is a bad row like an invalid JSON line ("file row N: not valid UTF-8 ..."); in a JSON
array or csv file it makes the whole file unreadable ("file line N: not valid UTF-8 ...").
A source with no row at all (an empty file, a folder of empty files, a split that selects
nothing) raises `DataError` naming it, as does a csv or parquet file that cannot be read.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from jaxpost.data.errors import (ENCODING, INVALID_JSON, NO_ROWS, UNREADABLE, WRONG_TYPE,
                                 DataError)

if TYPE_CHECKING:
  import datasets

JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")
SUFFIXES = (*JSON_LINES_SUFFIXES, ".json", ".parquet", ".csv")


class Row(NamedTuple):
  """One data row: `where` is "file row N"; `data` the row, or why it could not be read."""

  where: str
  data: dict[str, Any] | DataError


def data_files(path: str | Path) -> list[Path]:
  """The data files of a local file or folder (sorted), all of one kind.

  Raises:
    FileNotFoundError: a path with a data suffix that does not exist.
    ValueError: an unknown suffix, or a folder with no data files or mixed kinds.
  """
  path = Path(path)
  if path.is_dir():
    files = sorted(p for p in path.iterdir() if p.is_file() and _kind(p) is not None)
    if not files:
      raise ValueError(f"{path}: no data files in this folder (expected {', '.join(SUFFIXES)}).")
    kinds = {_kind(p) for p in files}
    if len(kinds) > 1:
      raise ValueError(f"{path}: the folder mixes data file kinds {sorted(kinds)}; keep one.")
    return files
  if _kind(path) is None:
    raise ValueError(f"{path}: unknown data file suffix {path.suffix!r}; expected one of "
                     f"{', '.join(SUFFIXES)}.")
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such data file.")
  return [path]


def _kind(path: Path) -> str | None:
  suffix = path.suffix.lower()
  if suffix in JSON_LINES_SUFFIXES:
    return "jsonl"
  return suffix[1:] if suffix in SUFFIXES else None


def _is_local(path_or_name: str | Path) -> bool:
  path = Path(path_or_name)
  return isinstance(path_or_name, Path) or path.exists() or _kind(path) is not None


# ---------------------------------------------------------------------------------------------
# JSON and JSON lines
# ---------------------------------------------------------------------------------------------


_UTF8_HINT = ("the data file must be UTF-8: convert it (e.g. `iconv -f latin1 -t utf-8 old > new`, "
              "with the file's encoding in place of latin1)")


def _encoding_detail(error: UnicodeDecodeError, column: int) -> str:
  """What is wrong with a line that is not UTF-8 (`column`: 1-based byte of the line)."""
  return (f"not valid UTF-8: byte 0x{error.object[error.start]:02x} at column {column}; "
          f"{_UTF8_HINT}")


def _encoding_error(path: Path, data: bytes, error: UnicodeDecodeError) -> DataError:
  """The error of a whole file (`data`) that is not UTF-8, located at its line."""
  line = data.count(b"\n", 0, error.start) + 1
  column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
  return DataError(ENCODING, _encoding_detail(error, column), where=f"{path} line {line}")


def _json_lines(path: Path, data: bytes) -> list[Row]:
  """One row per non-blank line of `data` (split on "\\n" only, so that a line separator
  inside a JSON string, such as U+2028, does not split a row); a line that is not UTF-8 or not
  JSON comes back as its `DataError`."""
  rows = []
  for number, raw in enumerate(data.split(b"\n"), start=1):
    if number == 1 and raw.startswith(codecs.BOM_UTF8):
      raw = raw[len(codecs.BOM_UTF8):]
    where = f"{path} row {number}"
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      rows.append(Row(where, DataError(ENCODING, _encoding_detail(e, e.start + 1), where=where)))
      continue
    if not line.strip():
      continue
    try:
      value = json.loads(line)
    except json.JSONDecodeError as e:
      rows.append(Row(where, DataError(INVALID_JSON, f"invalid JSON: {e.msg} (column {e.colno})",
                                       where=where)))
      continue
    rows.append(Row(where, value if isinstance(value, dict) else _not_an_object(where, value)))
  return rows


def _not_an_object(where: str, value: Any) -> DataError:
  return DataError(WRONG_TYPE, f"a row should be a JSON object, got {type(value).__name__}",
                   where=where)


def _read_json(path: Path) -> list[Row]:
  """A JSON array of objects, a single object, or (as datasets accepts) JSON lines in .json."""
  data = path.read_bytes()
  if _kind(path) == "jsonl":
    return _json_lines(path, data)
  is_array = data.lstrip(codecs.BOM_UTF8 + b" \t\r\n").startswith(b"[")
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    if is_array:
      raise _encoding_error(path, data, e) from None
    return _json_lines(path, data)  # JSON lines in a .json file: the row says where
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    if is_array:  # one document: its error's line, not the lines of a JSON lines file
      raise DataError(INVALID_JSON, f"invalid JSON: {e.msg} (column {e.colno}); the file is "
                      "read as one JSON array of objects", where=f"{path} line {e.lineno}") \
          from None
    return _json_lines(path, data)  # JSON lines in a .json file, or invalid: lines say where
  if isinstance(value, dict):
    return [Row(f"{path} row 1", value)]
  if not isinstance(value, list):
    raise DataError(WRONG_TYPE, f"a JSON data file should hold an array of objects, got "
                    f"{type(value).__name__}; write [{{...}}, {{...}}] in .json, or one object per "
                    "line in a .jsonl file", where=str(path))
  rows = []
  for number, item in enumerate(value, start=1):
    where = f"{path} row {number}"
    rows.append(Row(where, item if isinstance(item, dict) else _not_an_object(where, item)))
  return rows


# ---------------------------------------------------------------------------------------------
# csv and parquet
# ---------------------------------------------------------------------------------------------


def _load_typed(path: Path) -> datasets.Dataset:
  """A csv or parquet file as a Dataset; an unreadable file raises `DataError` naming it (its
  line, for a csv file that is not UTF-8; `NO_ROWS` for one without data rows)."""
  import datasets  # pylint: disable=import-outside-toplevel

  try:
    return datasets.load_dataset(_kind(path), data_files={"train": [str(path)]}, split="train")
  except Exception as e:  # pylint: disable=broad-except  # datasets wraps the reader's error
    raise _typed_file_error(path, e) from e


def _typed_file_error(path: Path, error: Exception) -> DataError:
  """Why datasets could not read a csv or parquet file, found by looking at the file."""
  kind = _kind(path)
  if path.stat().st_size == 0:
    return _no_rows(path, "the file is empty")
  if kind == "csv":
    data = path.read_bytes()
    try:
      text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
      return _encoding_error(path, data, e)
    if sum(1 for line in text.splitlines() if line.strip()) <= 1:
      return _no_rows(path, "it has a header line and no data rows")
  else:
    try:
      import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

      if pq.ParquetFile(path).metadata.num_rows == 0:
        return _no_rows(path, "its table has no rows")
    except Exception:  # pylint: disable=broad-except  # not parquet: said below
      pass
  cause = error
  while cause.__cause__ is not None or cause.__context__ is not None:
    cause = cause.__cause__ or cause.__context__
  return DataError(UNREADABLE, f"cannot read it as a {kind} file ({type(cause).__name__}: "
                   f"{cause}); check that it is a complete {kind} file, or write it again",
                   where=str(path))


def _no_rows(source: str | Path, why: str,
             todo: str = "check the path, and that the file was written completely") -> DataError:
  return DataError(NO_ROWS, f"{source} has no rows: {why}; {todo}")


def _why_empty(path: Path) -> str:
  """Why a local data file gave no rows."""
  if path.stat().st_size == 0:
    return "the file is empty"
  kind = _kind(path)
  if kind == "json" and path.read_bytes().strip(codecs.BOM_UTF8 + b" \t\r\n") == b"[]":
    return "it holds an empty JSON array"
  if kind in ("json", "jsonl"):
    return "it holds only blank lines"
  if kind == "csv":
    return "it has a header line and no data rows"
  return "its table has no rows"


def _load_typed_or_none(path: Path) -> datasets.Dataset | None:
  """`_load_typed`, None for a file without data rows."""
  try:
    return _load_typed(path)
  except DataError as e:
    if e.reason == NO_ROWS:
      return None
    raise


def _file_rows(path: Path) -> list[Row]:
  """The rows of one local data file ([] for a csv or parquet file without data rows)."""
  if _kind(path) in ("jsonl", "json"):
    return _read_json(path)
  dataset = _load_typed_or_none(path)
  return [] if dataset is None else _dataset_rows(dataset, str(path))


def _empty_error(source: str | Path, files: list[Path]) -> DataError:
  """The error of a local source whose files gave no rows."""
  if len(files) == 1 and not Path(source).is_dir():
    return _no_rows(files[0], _why_empty(files[0]))
  names = ", ".join(p.name for p in files)
  return _no_rows(source, f"its data files ({names}) hold no rows",
                  "check the path, and that the files were written completely")


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def _dataset_rows(dataset: datasets.Dataset, label: str) -> list[Row]:
  return [Row(f"{label} row {number}", dict(row)) for number, row in enumerate(dataset, start=1)]


def _split_indices(split: str, n: int, source: str | Path) -> range | list[int]:
  """The row indices a split of local files selects: "train", "train[:100]", "train[10%:]"."""
  if split == "train":
    return range(n)
  import datasets  # pylint: disable=import-outside-toplevel

  try:
    parts = datasets.ReadInstruction.from_spec(split).to_absolute({"train": n})
  except ValueError as e:
    raise DataError(WRONG_TYPE, f"split {split!r} does not apply to local files ({e}); they "
                    "form one split, 'train': use 'train', 'train[:100]' or 'train[10%:]'",
                    where=str(source)) from None
  return [i for part in parts for i in range(part.from_, part.to)]


def _load_hub(name: str, split: str) -> datasets.Dataset:
  import datasets  # pylint: disable=import-outside-toplevel

  return datasets.load_dataset(name, split=split)


def read_rows(source: str | Path | datasets.Dataset | list[Row], *, split: str = "train",
              label: str | None = None) -> list[Row]:
  """Every row of `source` (a local file or folder, a hub name, a `datasets.Dataset`, or rows
  read before, e.g. a replay buffer's, which come back as they are, origins kept).

  Unreadable rows (invalid JSON, a non-object line, a JSON line that is not UTF-8) come back as
  `Row(where, DataError)` instead of raising, so that the caller decides whether to stop or
  skip. `label` names an in-memory dataset in messages (default "dataset").

  Raises:
    DataError: the source has no rows ("data/train.jsonl has no rows: the file is empty"), or
      a file cannot be read at all (a csv or JSON array file that is not UTF-8, invalid JSON
      in a JSON array, a file that is not parquet).
  """
  if isinstance(source, list) and source and all(isinstance(r, Row) for r in source):
    return list(source)
  if not isinstance(source, (str, Path)):
    return _nonempty(_dataset_rows(source, label or "dataset"), label or "dataset")
  if not _is_local(source):
    name = label or str(source)
    return _nonempty(_dataset_rows(_load_hub(str(source), split), name), f"{name} ({split})")
  files = data_files(source)
  rows = [row for path in files for row in _file_rows(path)]
  if not rows:
    raise _empty_error(source, files)
  selected = [rows[i] for i in _split_indices(split, len(rows), source)]
  if not selected:
    raise DataError(NO_ROWS, f"split {split!r} selects none of its {len(rows)} rows; choose "
                    "another slice", where=str(source))
  return selected


def _nonempty(rows: list[Row], name: str) -> list[Row]:
  if not rows:
    raise _no_rows(name, "the dataset is empty", "check its name and split")
  return rows


def load_rows(path_or_name: str | Path, *, split: str = "train") -> datasets.Dataset:
  """The rows of a local data file or folder, or of a hub dataset, as a `datasets.Dataset`.

  Local files are chosen by suffix: .jsonl/.ndjson, .json, .parquet, .csv (a folder: every
  data file in it, sorted by name, all of one kind). Anything else that does not exist locally
  is passed to `datasets.load_dataset(path_or_name, split=split)`.

  Raises:
    DataError: an invalid JSON line or a row that is not an object ("file row N: ..."), JSON
      rows whose fields have types Arrow cannot unify (the first such row and field), or a
      source that has no rows or cannot be read (as `read_rows`).
  """
  import datasets  # pylint: disable=import-outside-toplevel

  if not _is_local(path_or_name):
    return _load_hub(str(path_or_name), split)
  files = data_files(path_or_name)
  if _kind(files[0]) not in ("jsonl", "json"):
    parts = [part for part in map(_load_typed_or_none, files) if part is not None]
    if not parts:
      raise _empty_error(path_or_name, files)
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return dataset if split == "train" else dataset.select(
        _split_indices(split, dataset.num_rows, path_or_name))
  rows = [row for path in files for row in _read_json(path)]
  if not rows:
    raise _empty_error(path_or_name, files)
  rows = [rows[i] for i in _split_indices(split, len(rows), path_or_name)]
  for row in rows:
    if isinstance(row.data, DataError):
      raise row.data
  try:
    return datasets.Dataset.from_list([row.data for row in rows])
  except (ValueError, TypeError) as e:  # pyarrow's ArrowInvalid / ArrowTypeError
    raise _schema_error(rows, e) from e


def _schema_error(rows: list[Row], error: Exception) -> DataError:
  """The first row (and field) that makes Arrow's schema inference fail, found by bisection."""
  import datasets  # pylint: disable=import-outside-toplevel

  def fails(records: list[dict[str, Any]]) -> bool:
    try:
      datasets.Dataset.from_list(records)
    except (ValueError, TypeError):
      return True
    return False

  data = [row.data for row in rows]
  lo, hi = 1, len(data)  # the shortest failing prefix has length in [lo, hi]
  while lo < hi:
    mid = (lo + hi) // 2
    lo, hi = (lo, mid) if fails(data[:mid]) else (mid + 1, hi)
  bad = data[hi - 1]
  field = next((key for key in bad if fails([{key: d.get(key)} for d in data[:hi]])), None)
  what = f"field '{field}' has" if field else "its fields have"
  return DataError(WRONG_TYPE, f"{what} a type that does not match earlier rows ({error})",
                   where=rows[hi - 1].where, field=field)
