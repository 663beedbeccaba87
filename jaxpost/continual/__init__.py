"""Continual learning: task sequences (`stages:`), replay (`data.replay`, in
`jaxpost.data.replay` and `jaxpost.algorithms.replay`), the L2 pull to the start weights
(`continual.l2_to_init`, `jaxpost.train.trainable.l2_to_start`) and the forgetting report.

    from jaxpost.continual import train_stages, forgetting_metrics
    summary = train_stages(load_config("configs/continual.yaml"))
    summary["continual"]["accuracy"]       # R[i][j]: task j after stage i
"""

from jaxpost.continual.report import forgetting_metrics, retention, write_report
from jaxpost.continual.sequence import train_stages

__all__ = ["forgetting_metrics", "retention", "train_stages", "write_report"]
