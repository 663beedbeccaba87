"""Where a run's data files come from: the recipe's `data.train` / `data.eval`, or a task the
package generates (`task:`), in the form each algorithm asks for.

    data = data_source(cfg, run_dir)
    data.path("sft", "train")        # a file (or dataset name) for build_sft_batches
    data.path("paired", "eval")      # preference pairs; "unpaired" for KTO rows
    data.corpus()                    # text to train a tiny model's tokenizer on

A task writes its files into `run_dir/data` the first time an algorithm asks for them (the
same content every time: they come from the task's settings and the seed), so building a run
for `jaxpost export` writes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

KINDS = ("sft", "paired", "unpaired")


def _strings(value: Any) -> Iterator[str]:
  if isinstance(value, str):
    yield value
  elif isinstance(value, dict):
    for v in value.values():
      yield from _strings(v)
  elif isinstance(value, list):
    for v in value:
      yield from _strings(v)


class FileData:
  """The recipe's own files: the same for every kind of data (the rows say which it is)."""

  def __init__(self, train: str | None, eval: str | None):  # pylint: disable=redefined-builtin
    self.files = {"train": train, "eval": eval}

  def path(self, kind: str, split: str) -> str | None:
    del kind
    return self.files[split]

  def corpus(self) -> list[str]:
    """Every string of the training rows, one line per row."""
    from jaxpost.data import read_rows  # pylint: disable=import-outside-toplevel
    return [" ".join(_strings(row.data)) for row in read_rows(self.files["train"])]

  exact_match_rows = None


class ArithmeticTask:
  """`jaxpost.tasks.arithmetic`'s questions, as chat rows (SFT), preference pairs or KTO rows;
  `exact_match_rows()` are the held-out questions with their answers."""

  def __init__(self, *, max_operand: int, num_eval: int, seed: int, folder: Path,
               op: str = "add"):
    self.settings = dict(max_operand=max_operand, num_eval=num_eval, seed=seed, op=op)
    self.folder = folder
    self._paths: dict[str, tuple[Path, Path]] = {}

  def path(self, kind: str, split: str) -> str:
    from jaxpost import multihost  # pylint: disable=import-outside-toplevel
    from jaxpost.tasks import arithmetic, arithmetic_pref  # pylint: disable=import-outside-toplevel
    if kind not in KINDS:
      raise ValueError(f"the arithmetic task has data of kinds {KINDS}, not {kind!r}")
    if kind not in self._paths:  # written by the first process; the others wait, then read
      if kind == "sft":
        write = lambda: arithmetic.write_dataset(self.folder, **self.settings)  # noqa: E731
        names = ("train.jsonl", "eval.jsonl")
      else:
        write = lambda: arithmetic_pref.write_preference_dataset(  # noqa: E731
            self.folder, kind=kind, **self.settings)
        names = (f"{kind}_train.jsonl", f"{kind}_eval.jsonl")
      multihost.first_process(write, f"task-data:{kind}")
      self._paths[kind] = (self.folder / names[0], self.folder / names[1])
    return str(self._paths[kind][0 if split == "train" else 1])

  def _split(self):
    from jaxpost.tasks import arithmetic  # pylint: disable=import-outside-toplevel
    return arithmetic.make_split(**self.settings)

  def corpus(self) -> list[str]:
    from jaxpost.tasks import arithmetic  # pylint: disable=import-outside-toplevel
    return arithmetic.corpus(self._split()[0])

  def exact_match_rows(self) -> list[dict]:
    return self._split()[1]


def data_source(cfg, run_dir: Path) -> FileData | ArithmeticTask:
  """The data source of a `RunConfig`."""
  if cfg.task is None:
    return FileData(cfg.data.train, cfg.data.eval)
  t = cfg.task
  return ArithmeticTask(max_operand=t.max_operand, num_eval=t.num_eval, seed=cfg.train.seed,
                        folder=Path(run_dir) / "data", op=t.op)
