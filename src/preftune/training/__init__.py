"""DPO training: ``train(config)`` runs a recipe (loop.py); state.py carries it from step to step,
metrics.py measures it, prepare.py sets it up, finish.py writes the final report."""

from preftune.memory import Bf16WeightGrads, HeapTrimmer, HeldGradLinear, make_autocast, recast_saved_weight_casts
from preftune.training.loop import train
from preftune.training.metrics import METRIC_KEYS, StepMetrics, evaluate
from preftune.training.prepare import PreparedData, make_forward, prepare_data, row_length_multiple
from preftune.training.state import build_schedule, find_checkpoint, save_checkpoint

__all__ = [
    "Bf16WeightGrads", "HeapTrimmer", "HeldGradLinear", "METRIC_KEYS", "PreparedData", "StepMetrics", "build_schedule",
    "evaluate", "find_checkpoint", "make_autocast", "make_forward", "prepare_data", "recast_saved_weight_casts",
    "row_length_multiple", "save_checkpoint", "train",
]  # fmt: skip
