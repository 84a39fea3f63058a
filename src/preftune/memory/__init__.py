"""The run's memory plan: every trick that saves memory or time without changing a number.

``MemoryPlan.apply`` (plan.py) turns them on for a run and reports them; precision.py says which
precision a run computes in, autocast.py makes its autocast.
"""

from preftune.memory.autocast import make_autocast, recast_saved_weight_casts
from preftune.memory.bf16_grads import Bf16WeightGrads, HeldGradLinear
from preftune.memory.compaction import compact_frozen_linears, restore_frozen_linears
from preftune.memory.heap import HeapTrimmer, current_rss_mb, peak_gpu_mb, peak_rss_mb, return_free_memory
from preftune.memory.plan import MemoryPlan
from preftune.memory.precision import autocast_dtype, precision_name, resolve_precision

__all__ = [
    "Bf16WeightGrads", "HeapTrimmer", "HeldGradLinear", "MemoryPlan", "autocast_dtype", "compact_frozen_linears",
    "current_rss_mb", "make_autocast", "peak_gpu_mb", "peak_rss_mb", "precision_name", "recast_saved_weight_casts",
    "resolve_precision", "restore_frozen_linears", "return_free_memory",
]  # fmt: skip
