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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from jaxpost.data.errors import INVALID_JSON, WRONG_TYPE, DataError

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


def _json_lines(path: Path, text: str) -> list[Row]:
  rows = []
  for number, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    where = f"{path} row {number}"
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
  text = path.read_text(encoding="utf-8")
  if _kind(path) == "jsonl":
    return _json_lines(path, text)
  try:
    value = json.loads(text)
  except json.JSONDecodeError:
    return _json_lines(path, text)  # JSON lines in a .json file, or invalid: lines say where
  if isinstance(value, dict):
    return [Row(f"{path} row 1", value)]
  if not isinstance(value, list):
    raise DataError(WRONG_TYPE, f"a JSON data file should hold an array of objects, got "
                    f"{type(value).__name__}", where=str(path))
  rows = []
  for number, item in enumerate(value, start=1):
    where = f"{path} row {number}"
    rows.append(Row(where, item if isinstance(item, dict) else _not_an_object(where, item)))
  return rows


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def _load_typed(path: Path) -> datasets.Dataset:
  import datasets  # pylint: disable=import-outside-toplevel

  return datasets.load_dataset(_kind(path), data_files={"train": [str(path)]}, split="train")


def _dataset_rows(dataset: datasets.Dataset, label: str) -> list[Row]:
  return [Row(f"{label} row {number}", dict(row)) for number, row in enumerate(dataset, start=1)]


def _split_indices(split: str, n: int) -> range | list[int]:
  """The row indices a split of local files selects: "train", "train[:100]", "train[10%:]"."""
  if split == "train":
    return range(n)
  import datasets  # pylint: disable=import-outside-toplevel

  parts = datasets.ReadInstruction.from_spec(split).to_absolute({"train": n})
  return [i for part in parts for i in range(part.from_, part.to)]


def _load_hub(name: str, split: str) -> datasets.Dataset:
  import datasets  # pylint: disable=import-outside-toplevel

  return datasets.load_dataset(name, split=split)


def read_rows(source: str | Path | datasets.Dataset, *, split: str = "train",
              label: str | None = None) -> list[Row]:
  """Every row of `source` (a local file or folder, a hub name, or a `datasets.Dataset`).

  Unreadable rows (invalid JSON, a non-object line) come back as `Row(where, DataError)`
  instead of raising, so that the caller decides whether to stop or skip. `label` names an
  in-memory dataset in messages (default "dataset").
  """
  if not isinstance(source, (str, Path)):
    return _dataset_rows(source, label or "dataset")
  if not _is_local(source):
    return _dataset_rows(_load_hub(str(source), split), label or str(source))
  rows = []
  for path in data_files(source):
    if _kind(path) in ("jsonl", "json"):
      rows.extend(_read_json(path))
    else:
      rows.extend(_dataset_rows(_load_typed(path), str(path)))
  return [rows[i] for i in _split_indices(split, len(rows))]


def load_rows(path_or_name: str | Path, *, split: str = "train") -> datasets.Dataset:
  """The rows of a local data file or folder, or of a hub dataset, as a `datasets.Dataset`.

  Local files are chosen by suffix: .jsonl/.ndjson, .json, .parquet, .csv (a folder: every
  data file in it, sorted by name, all of one kind). Anything else that does not exist locally
  is passed to `datasets.load_dataset(path_or_name, split=split)`.

  Raises:
    DataError: an invalid JSON line or a row that is not an object ("file row N: ..."), or
      JSON rows whose fields have types Arrow cannot unify (the first such row and field).
  """
  import datasets  # pylint: disable=import-outside-toplevel

  if not _is_local(path_or_name):
    return _load_hub(str(path_or_name), split)
  files = data_files(path_or_name)
  if _kind(files[0]) not in ("jsonl", "json"):
    parts = [_load_typed(path) for path in files]
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return dataset if split == "train" else dataset.select(
        _split_indices(split, dataset.num_rows))
  rows = [row for path in files for row in _read_json(path)]
  rows = [rows[i] for i in _split_indices(split, len(rows))]
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
