"""Every memory and speed trick a run uses, applied in one place and reported in one place.

Each trick gives the same numbers as the plain run (twin tests in tests/), only less memory or time:

short-row attention   CPU + bf16 + fast path: short packed rows take ShortRowAttention
                      (kernels/short_row_attention.py), the policy and a frozen reference copy
compact frozen        under autocast: frozen fp32 Linear weights held in the autocast dtype
                      (LoRA's base layers; a full fine-tuning reference that only serves the
                      precompute), put back in fp32 before the final report and final/
bf16 weight grads     full fine-tuning under bf16: Linear weight gradients held in bf16
fused SwiGLU          no gradient checkpointing: the policy's Llama-family MLPs recompute silu(gate)
                      in backward instead of keeping it (kernels/swiglu.py)
heap trimming         glibc's freed heap handed back after setup and when the RSS creeps up

Set elsewhere, as they belong to other objects: the autocast and its saved-tensor hooks
(``make_autocast``, given to every forward), selective checkpointing (``build_policy_and_reference``)
and the tied LM head's projection (``chunked_head_logps``).
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from preftune.config import TrainConfig
from preftune.kernels.short_row_attention import disable_short_row_attention, enable_short_row_attention
from preftune.kernels.swiglu import disable_swiglu, enable_swiglu
from preftune.memory.bf16_grads import Bf16WeightGrads
from preftune.memory.compaction import compact_frozen_linears, restore_frozen_linears
from preftune.memory.heap import HeapTrimmer, peak_rss_mb, return_free_memory
from preftune.memory.precision import autocast_dtype
from preftune.modeling import Reference


@dataclass
class MemoryPlan:
    compacted: list[str] = field(default_factory=list)  # the policy's compacted Linear modules
    short_row_layers: int = 0
    bf16_grads: Bf16WeightGrads | None = None
    trimmer: HeapTrimmer = field(default_factory=HeapTrimmer)
    train_peak_rss_mb: float | None = None  # loading, reference and training; set by finish_training
    _attention_models: list[weakref.ref] = field(default_factory=list)
    swiglu_mlps: list[nn.Module] = field(default_factory=list)
    _holding_grads: bool = False
    notes: list[str] = field(default_factory=list)  # a trick turned off, and why (printed, in summary.json)

    @classmethod
    def apply(cls, cfg: TrainConfig, model: nn.Module, reference: Reference | None, device: torch.device, *,
              precompute_reference: bool, distributed: bool = False) -> MemoryPlan:  # fmt: skip
        """Apply the tricks ``cfg`` turns on to the policy (and the frozen reference copy, if any).

        ``precompute_reference``: the reference log-probs are computed once before training, so a
        frozen reference copy only serves that and may be compacted too. ``distributed``: several
        ranks sum their gradients, which must then all be in ``.grad``."""
        plan = cls()
        try:
            plan._apply(cfg, model, reference, device, precompute_reference, distributed)
        except BaseException:
            plan.close()  # a half-applied plan takes off what it had put on
            raise
        return plan

    def _apply(self, cfg: TrainConfig, model: nn.Module, reference: Reference | None, device: torch.device,
               precompute_reference: bool, distributed: bool) -> None:  # fmt: skip
        t, plan = cfg.training, self
        amp_dtype = autocast_dtype(cfg)
        frozen = reference.frozen if reference is not None else None
        if t.short_row_attention and t.fast_path and device.type == "cpu" and amp_dtype == torch.bfloat16:
            plan.short_row_layers = plan._enable_short_rows(model)
            if frozen is not None:  # the same kernel: the same rounding
                plan._enable_short_rows(frozen)
        compact = t.compact_frozen_weights and amp_dtype is not None
        if compact and cfg.model.finetuning_type == "lora":
            plan.compacted = compact_frozen_linears(model, amp_dtype)
        if compact and frozen is not None and precompute_reference:
            compact_frozen_linears(frozen, amp_dtype)  # dropped after the precompute: never restored
        if t.fused_swiglu and not cfg.model.gradient_checkpointing:
            plan.swiglu_mlps = enable_swiglu(model)
        bf16_grads = t.bf16_weight_grads and amp_dtype == torch.bfloat16 and cfg.model.finetuning_type == "full"
        if bf16_grads and distributed:  # its gradients live outside .grad, where the ranks' sum would miss them
            plan.notes.append("bf16_weight_grads off under torchrun: gradients are summed over the ranks in .grad")
        elif bf16_grads:
            plan.bf16_grads = Bf16WeightGrads(model)
            plan._holding_grads = True

    def _enable_short_rows(self, model: nn.Module) -> int:
        self._attention_models.append(weakref.ref(model))
        return enable_short_row_attention(model)

    def after_setup(self) -> None:
        """The loading and the reference precompute leave garbage and freed heap behind."""
        gc.collect()
        return_free_memory()

    def after_step(self) -> None:
        self.trimmer.after_step()

    def finish_training(self, model: nn.Module, model_path: str, cfg: TrainConfig) -> None:
        """After the last step and evaluation: plain gradients again, and the compacted weights back
        in fp32 for the final report and final/."""
        self._stop_holding_grads()
        self.train_peak_rss_mb = peak_rss_mb()
        return_free_memory()
        restore_frozen_linears(model, self.compacted, model_path, cfg.model)

    def summary(self) -> dict[str, Any]:
        """What the plan did, as summary.json reports it."""
        out: dict[str, Any] = {"compacted_frozen_linears": len(self.compacted)}
        if self.train_peak_rss_mb is not None:
            out["train_peak_rss_mb"] = round(self.train_peak_rss_mb, 1)
        out["heap_trims"] = self.trimmer.trims
        out["short_row_attention_layers"] = self.short_row_layers
        out["fused_swiglu_layers"] = len(self.swiglu_mlps)
        if self.notes:
            out["memory_plan_notes"] = list(self.notes)
        if self.bf16_grads is not None:
            held = self.bf16_grads
            out["bf16_weight_grads"] = {"weights": len(held.handles), "kept_fp32": len(held.fp32_only),
                                        "held_directly": len(held.rerouted)}  # fmt: skip
        return out

    def close(self) -> None:
        """Take off what is still on (hooks, forward replacements, the attention implementation)."""
        self._stop_holding_grads()
        disable_swiglu(self.swiglu_mlps)
        self.swiglu_mlps = []
        for ref in self._attention_models:
            model = ref()
            if model is not None:
                disable_short_row_attention(model)
        self._attention_models = []

    def __enter__(self) -> MemoryPlan:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _stop_holding_grads(self) -> None:
        if self._holding_grads:
            self.bf16_grads.remove()
            self._holding_grads = False
