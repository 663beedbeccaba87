"""Evaluation, a loop of its own (`jaxpost eval`, the sidecar, a recipe's `eval:` section).

    from jaxpost.eval import EvalModel, Evaluator
    ev = Evaluator(EvalSection(suites={...}), config, tokenizer)
    ev.evaluate(params, reference_params)      # {"eval/<suite>/<metric>": value}

See docs/architecture.md ("Evaluation") for the suites, the sidecar and the report.
"""

from jaxpost.eval import metrics
from jaxpost.eval.command import run_eval
from jaxpost.eval.engine import EvalModel, compilations
from jaxpost.eval.report import write_report
from jaxpost.eval.runner import Evaluator

__all__ = ["EvalModel", "Evaluator", "compilations", "metrics", "run_eval", "write_report"]
