"""``preftune estimate``: peak memory per device of a run, from its config and the model's config.json (no
weights load). The formula and its check against measured peaks: docs/scaling.md. Units: bytes; a "token" is
one position of the packed ``[prompt | chosen | rejected]`` rows, padding included."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from preftune.config import DEFAULT_MODEL, TrainConfig, load_config
from preftune.errors import PreftuneError

GiB, MiB = 2**30, 2**20
# SmolLM2-135M-Instruct's published shapes: used when the offline default is not converted yet
# (its config then only exists inside the GGUF file, and reading that would load the weights).
SMOLLM2_135M = {"hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536, "vocab_size": 49152,
                "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "tie_word_embeddings": True}
LORA_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # PEFT's all-linear
HEAD_CHUNK = 1024  # forward.chunked_head_logps: at most a (1024, V) block of logits alive
DDP_BUCKET = 32 * MiB  # distributed.BUCKET_BYTES: the flat bucket of the gradient all-reduce
CPU_RUNTIME_MIB = 420  # python + torch 2.13 CPU + transformers + peft + tokenizer (docs/scaling.md)
CUDA_CONTEXT_MIB = 600  # CUDA context and kernels outside torch's allocator: an assumption, not measured
ASSUMED_MFU, H100_BF16_TFLOPS = 0.4, 989.0  # step-time line: both are assumptions


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    source: str

    @classmethod
    def from_config_json(cls, raw: dict, source: str) -> ModelShape:
        raw = raw.get("text_config", raw) if isinstance(raw, dict) else {}  # multimodal: the language model's
        if any(k in raw for k in ("num_experts", "num_local_experts", "n_routed_experts")):
            raise PreftuneError("mixture-of-experts models are not in the estimate's formula", source)
        try:
            h, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
            return cls(h, int(raw["num_hidden_layers"]), int(raw["intermediate_size"]), int(raw["vocab_size"]),
                       heads, int(raw.get("num_key_value_heads") or heads), int(raw.get("head_dim") or h // heads),
                       bool(raw.get("tie_word_embeddings", False)), source)  # fmt: skip
        except (KeyError, TypeError, ValueError) as e:
            raise PreftuneError(f"config.json has no usable {e} (the estimate knows Llama-style decoders: "
                                "Llama, Qwen2, Mistral, SmolLM)", source) from None  # fmt: skip

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each Linear of one decoder layer."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip

    @property
    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    @property
    def layer_params(self) -> int:  # + two norms (q/k/v biases, where a model has them, are left out: < 0.1%)
        return self.layer_linear_params + 2 * self.hidden

    @property
    def root_params(self) -> int:  # embedding, untied head, final norm: FSDP's root unit
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    params = property(lambda self: self.layers * self.layer_params + self.root_params)


def read_model_shape(name: str) -> ModelShape:
    """Shapes from ``name``'s config.json: a directory or config.json file, or the offline default."""
    if name == DEFAULT_MODEL:
        from preftune.modeling import preftune_home

        converted = preftune_home() / "models" / DEFAULT_MODEL / "config.json"
        if not converted.is_file():
            return ModelShape.from_config_json(SMOLLM2_135M, f"{DEFAULT_MODEL} (published shapes)")
        path = converted
    else:
        path = Path(name).expanduser()
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise PreftuneError(f"model '{name}': the estimate needs a local config.json (no download)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PreftuneError(f"cannot read {path}: {e}") from None
    return ModelShape.from_config_json(raw, str(path))


def parse_memory(text: str) -> int:
    """'80GB', '80 GiB', '24000MB', '1.5TB' -> bytes (powers of 1024: an '80 GB' H100 has 80 GiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT])(?:i?B)?\s*", text, re.IGNORECASE)
    if m is None or float(m.group(1)) <= 0:
        raise PreftuneError(f"--device-memory '{text}': give a size such as 80GB, 24GiB or 16000MB")
    return int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2).upper()) * 1024)


@dataclass(frozen=True)
class Batch:
    """One micro-batch on one device, as the fast path packs it: R rows of L tokens, N scored positions."""

    rows: int
    row_len: int
    scored: int
    how: str
    tokens = property(lambda self: self.rows * self.row_len)


@dataclass(frozen=True)
class Setting:
    full: bool  # full fine-tuning, else LoRA
    lora_r: int
    lora_targets: tuple[str, ...]
    amp: bool  # bf16/fp16 autocast (fp32 master weights) vs fp32
    weight_bytes: int  # the trained weights' dtype: 4 unless dtype is bfloat16/float16
    ckpt: str  # none, full, selective
    reference: str  # none, cached, on the fly
    dist: str  # single, ddp, fsdp
    nproc: int
    accumulation: int
    cpu: bool
    fused_swiglu: bool = True
    compact_frozen: bool = True
    bf16_grads: bool = True
    keep_healthy: bool = False  # stop_on_collapse: the guard keeps a host copy of the trainable weights


def lora_params(shape: ModelShape, s: Setting) -> int:
    return shape.layers * sum(s.lora_r * (a + b) for n, (a, b) in shape.linear_shapes().items() if n in s.lora_targets)


def layer_activation(shape: ModelShape, s: Setting, row_len: int) -> float:
    """Bytes autograd keeps per token and decoder layer without checkpointing (counted with saved-tensor
    hooks on transformers' Llama layer, see docs/scaling.md). b: the compute dtype's bytes; norms, the
    residual stream and rotary run in fp32 (4 bytes) also under autocast."""
    h, i, heads, b = shape.hidden, shape.intermediate, shape.heads, (2 if s.amp else 4)
    qd = heads * shape.head_dim
    t = set(LORA_ALL) if s.full else set(s.lora_targets)
    norms = 16 * h if s.full else 8 * h  # per norm: input x, and x/rms for a trained norm weight
    if not s.amp:  # one saved input per norm output, shared by the Linears that read it
        inputs = 4 * h * (bool(t & {"q_proj", "k_proj", "v_proj"}) + bool(t & {"gate_proj", "up_proj"}))
    else:  # autocast casts the input once per Linear that saves it; LoRA's o_proj saves a copy too
        inputs = 2 * h * len(t & {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"})
        inputs += 2 * qd * (not s.full and "o_proj" in t)
    attention = 4 * qd * b + 4 * heads + row_len * b  # q, repeated k and v, output; logsumexp; float mask row
    mlp = (3 if s.fused_swiglu and s.ckpt == "none" else 4) * i * b  # gate, up, product (+ silu(gate))
    lora = 0 if s.full else len(t & set(LORA_ALL)) * s.lora_r * b  # lora_A outputs
    return norms + inputs + attention + mlp + lora + 8  # + two fp32 rsqrt


def activations(shape: ModelShape, s: Setting, batch: Batch) -> tuple[float, float]:
    """(kept through the forward, extra at the worst moment of backward), bytes for one micro-batch."""
    b, T, N, V, h = (2 if s.amp else 4), batch.tokens, batch.scored, shape.vocab, shape.hidden
    per_layer = layer_activation(shape, s, batch.row_len) * T
    rotary = 2 * T * shape.head_dim * 4  # cos, sin (fp32), shared by the layers
    final_norm = (8 if s.full else 4) * h * T
    head_in = N * h * b if s.full else (V * h * 2 if s.amp else 0)  # LoRA+autocast: the frozen head's cast
    chunk = min(N, HEAD_CHUNK)
    logits = N * V * b if N <= HEAD_CHUNK else 0  # one chunk: kept; more: each chunk recomputed in backward
    if s.ckpt == "none":  # LoRA: the first layer's input (the frozen embedding's output) needs no gradient
        kept = shape.layers * per_layer - (0 if s.full else 4 * h * T)
        layer_bwd = per_layer  # gradients of one layer's activations
    else:  # each layer's input (fp32) kept; in backward one layer is rerun and differentiated
        kept = shape.layers * 4 * h * T + T * T // batch.rows  # + the shared bool mask
        if s.ckpt == "selective":  # matmul outputs (LoRA: lora_A's and lora_B's too) and attention outputs kept
            lin = sum(o + (0 if s.full or n not in s.lora_targets else o + s.lora_r)
                      for n, (_, o) in shape.linear_shapes().items())  # fmt: skip
            kept += shape.layers * T * ((lin + shape.heads * shape.head_dim) * b + 4 * shape.heads)
        layer_bwd = 2 * per_layer
    kept += rotary + final_norm + head_in + logits
    head_bwd = 2 * chunk * V * b - logits + N * h * 4  # logits and their gradient; gradient of the hidden states
    return kept, max(head_bwd, layer_bwd)


@dataclass
class Estimate:
    weights: float  # policy (+ a frozen reference held through training)
    grads: float
    optimizer: float
    activations: float  # kept through the forward + the worst extra in backward
    other: float  # FSDP buffers, DDP bucket, runtime (CPU process or CUDA context)
    peak: float
    phase: str  # where the peak is
    heap: float = 0.0  # CPU: up to this much more RSS in heap glibc keeps after free
    phases: dict[str, float] | None = None  # each phase's peak, runtime included


def estimate(shape: ModelShape, s: Setting, batch: Batch, eval_batch: Batch) -> Estimate:
    """Peak bytes on one device: its largest phase. Under torchrun LoRA with fsdp runs as ddp (shard_if_fsdp)."""
    s = replace(s, dist="ddp") if s.dist == "fsdp" and not s.full else s
    n = s.nproc if s.dist == "fsdp" else 1  # FSDP shards weights, gradients and AdamW over the ranks
    P, linear = shape.params, shape.layers * shape.layer_linear_params
    trainable = P if s.full else lora_params(shape, s)
    wb = s.weight_bytes
    if s.full:
        weights = P * wb
    else:  # LoRA: frozen base Linears in the autocast dtype (compact_frozen_weights), adapters fp32
        weights = linear * (2 if s.amp and s.compact_frozen else wb) + (P - linear) * wb + trainable * 4
    grads = trainable * (wb if s.full else 4)
    if s.full and s.amp and s.bf16_grads and s.dist == "single":  # Linear weight gradients held in bf16
        grads -= linear * (wb - 2)
    optimizer = 2 * trainable * (wb if s.full else 4)  # AdamW exp_avg, exp_avg_sq in the weights' dtype
    weights, grads, optimizer = weights / n, grads / n, optimizer / n
    # full fine-tuning's frozen reference copy (whole on every rank): held when not cached, else for the precompute
    ref_held = P * wb if s.full and s.reference == "on the fly" else 0.0
    ref_setup = (linear * (2 if s.amp and s.compact_frozen else wb) + (P - linear) * wb) if s.full else 0.0
    other = 0.0
    if s.dist == "fsdp":  # unsharded root through forward+backward; current + prefetched layer; one layer's fp32 grads
        pb = 2 if s.amp else wb
        other = shape.root_params * pb + shape.layer_params * (2 * pb + 4)
    bucket = 2 * DDP_BUCKET if s.dist == "ddp" and s.nproc > 1 else 0  # flat bucket and its all-reduce copy
    # end of backward (full): the embedding's dense (V, h) gradient, added to the head's if tied; CPU: two (measured)
    embed_bwd = shape.vocab * shape.hidden * 4 * (2 if s.cpu else 1) if s.full else 0
    kept, extra = activations(shape, s, batch)
    # accumulation: the gradients live through the next micro-batch, whose new (V, h) head gradient is added to them
    early = grads + (shape.vocab * shape.hidden * 4 if s.full else 0) if s.accumulation > 1 else 0
    # stop_on_collapse: the guard keeps a host copy of the trainable weights (in a CPU run's RSS), two at a check
    snapshot = 4.0 * trainable if s.keep_healthy and s.cpu else 0.0
    train = weights + ref_held + optimizer + other + snapshot
    train += max(kept + extra + early, grads + max(bucket, embed_bwd))
    precompute = weights + ref_setup + other + inference_transient(shape, s, eval_batch)
    # loading: every rank loads the whole policy (and reference copy) in the weights' dtype, then shards, compacts
    phases = {"training": train, "loading": P * wb * (2 if s.full and s.reference != "none" else 1),
              "reference precompute": precompute if s.reference == "cached" else 0.0,
              "collapse-guard snapshot": weights + ref_held + optimizer + 2 * snapshot}  # fmt: skip
    if s.dist == "fsdp" and s.cpu:  # a checkpoint gathers the whole weights and AdamW state on rank 0's host
        phases["checkpoint, rank 0"] = weights + optimizer + snapshot + fsdp_gather(shape, s)
    phase = max(phases, key=phases.__getitem__)
    runtime = (CPU_RUNTIME_MIB if s.cpu else CUDA_CONTEXT_MIB) * MiB
    # CPU: glibc keeps freed heap until preftune trims it (memory/heap.py): measured 0.3-1.5 x the activations
    heap = 1.5 * sum(activations(shape, replace(s, ckpt="none"), batch)) if s.cpu else 0.0
    return Estimate(weights + ref_held, grads, optimizer, kept + extra, other + bucket + runtime, phases[phase] + runtime,
                    phase, heap, {k: v + runtime for k, v in phases.items()})  # fmt: skip


def fsdp_gather(shape: ModelShape, s: Setting) -> float:  # distributed.full_model_state, full_optimizer_state
    return 3 * shape.params * s.weight_bytes if s.full else 0.0


def inference_transient(shape: ModelShape, s: Setting, batch: Batch) -> float:
    """A no-grad forward (the reference precompute) keeps nothing: its peak is inside one MLP (residual and
    norm output in fp32, the input cast, gate, up, silu(gate), product), the masks and one head chunk."""
    b, h = (2 if s.amp else 4), shape.hidden
    mlp = batch.tokens * (8 * h + (2 * h if s.amp else 0) + 4 * shape.intermediate * b)
    return mlp + batch.rows * batch.row_len**2 * (1 + b) + min(batch.scored, HEAD_CHUNK) * shape.vocab * b


def step_tflop(shape: ModelShape, s: Setting, batch: Batch) -> float:
    """Compute per device per optimizer step: 6N per trained token (4N for LoRA: no weight gradients of the
    frozen base), +2N with full checkpointing (the rerun), +2N per token of an on-the-fly reference forward;
    N without the embedding, the LM head only on scored positions, attention's 12 x layers x h x L per token."""
    body = shape.layers * shape.layer_params
    per = (6 if s.full else 4) + (2 if s.ckpt == "full" else 0) + (2 if s.reference == "on the fly" else 0)
    attention = 12 * shape.layers * shape.heads * shape.head_dim * batch.row_len  # QK^T and AV, forward + backward
    flop = batch.tokens * (per * body + attention) + batch.scored * per * shape.vocab * shape.hidden
    return flop * s.accumulation / 1e12


# ---------------------------------------------------------------- the run's micro-batches


def worst_case_batch(cfg: TrainConfig, pair_tokens: int | None, multiple: int) -> Batch:
    """Every pair at its longest: P + C + R <= 2 * max_length (P + C and P + R each fit max_length), one
    row per pair (the default row budget is the longest pair), every completion token scored."""
    b, max_len = cfg.training.per_device_train_batch_size, cfg.data.max_length
    if not cfg.training.fast_path:  # two right-padded rows per pair, full logits
        return Batch(2 * b, max_len, 2 * b * max_len, f"padded path: {2 * b} rows of max_length {max_len}")
    tokens = pair_tokens or 2 * max_len
    how = f"{tokens} tokens per pair (P+C+R" + (")" if pair_tokens else f" <= 2 x max_length {max_len}, worst case)")
    return Batch(b, -(-tokens // multiple) * multiple, b * tokens, how)


def data_batches(cfg: TrainConfig, multiple: int, nproc: int = 1) -> list[Batch]:
    """The run's own micro-batches in its first epoch (tokenizer and data only, no weights): each rank's share
    of every global micro-batch, as the loop packs it; distinct (R, L, N)."""
    from preftune.distributed import Ranks
    from preftune.modeling import load_tokenizer, preftune_home, resolve_model_path
    from preftune.packing import plan_rows
    from preftune.training.prepare import prepare_data
    from preftune.training.state import build_schedule

    name = cfg.model.model_name_or_path
    if name == DEFAULT_MODEL and not (preftune_home() / "models" / DEFAULT_MODEL / "config.json").is_file():
        raise PreftuneError("--data needs the converted default model: run `preftune train` once, or leave out --data")
    pairs = prepare_data(cfg, load_tokenizer(cfg.model, resolve_model_path(name))).train
    size = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
    schedule, per_epoch = build_schedule(len(pairs), cfg, nproc)
    seen: set[tuple[int, int, int]] = set()
    for step in range(min(len(schedule), per_epoch)):
        for global_batch in schedule[step]:
            for rank in range(nproc):
                mine = Ranks(rank, nproc).shard(global_batch, [size[i] for i in global_batch]) or global_batch[:1]
                rows = plan_rows([size[i] for i in mine], cfg.training.max_tokens_per_row)
                width = max(sum(size[mine[j]] for j in row) for row in rows)
                scored = sum(len(pairs[i].chosen_ids) + len(pairs[i].rejected_ids) for i in mine)
                seen.add((len(rows), -(-width // multiple) * multiple, scored))
    return [Batch(r, L, n, f"from the data: {r} rows of {L} tokens, {n} scored") for r, L, n in sorted(seen)]


# ---------------------------------------------------------------- from a config to the printed table


def base_setting(cfg: TrainConfig, device: str, nproc: int) -> tuple[Setting, str]:
    """The config's setting, and its precision in words (``auto``: bf16 on cuda, assumed; on cpu as a run decides)."""
    from preftune.losses import needs_reference

    m, t = cfg.model, cfg.training
    if t.fp16 is True or t.bf16 is True:
        amp, precision = True, "fp16 autocast" if t.fp16 is True else "bf16 autocast"
    elif t.bf16 != "auto" or device == "cuda":
        amp, precision = t.bf16 == "auto", "bf16 autocast (bf16: auto, assumed a GPU with bf16)" if t.bf16 else "fp32"
    else:
        from preftune.hardware import cpu_info

        amp = cpu_info().native_bf16
        precision = ("bf16 autocast" if amp else "fp32") + " (bf16: auto on this CPU)"
    targets = LORA_ALL if m.lora_target in ("all", ["all"]) else tuple(m.lora_target)
    cached = "on the fly" if t.precompute_ref_log_probs is False else "cached"
    reference = cached if needs_reference(cfg.loss_types) else "none"
    setting = Setting(
        full=m.finetuning_type == "full", lora_r=m.lora_r, lora_targets=targets, amp=amp,
        weight_bytes={"bfloat16": 2, "float16": 2}.get(m.dtype, 4), ckpt=m.checkpointing_mode,
        reference=reference, dist="single" if nproc == 1 else t.distributed, nproc=nproc,
        accumulation=t.gradient_accumulation_steps, cpu=device == "cpu", fused_swiglu=t.fused_swiglu,
        compact_frozen=t.compact_frozen_weights, bf16_grads=t.bf16_weight_grads, keep_healthy=t.stop_on_collapse,
    )  # fmt: skip
    return setting, precision


def load_estimate_config(source: str, overrides: list[str]) -> TrainConfig:
    """A run config (YAML), or a model directory / config.json alone (then preftune's default settings)."""
    path = Path(source)
    if path.is_dir() or path.name == "config.json":
        if not (path / "config.json" if path.is_dir() else path).is_file():
            raise PreftuneError(f"{source}: no config.json there")
        base = {"model_name_or_path": str(path), "train_file": "(not read by estimate)"}
        return load_config(base, overrides)
    return load_config(source, overrides)


def run_estimate(source: str, overrides: list[str], *, nproc: int, device_memory: str, device: str = "cuda",
                 data: bool = False, pair_tokens: int | None = None) -> str:  # fmt: skip
    """The text ``preftune estimate`` prints."""
    capacity = parse_memory(device_memory)
    if nproc < 1:
        raise PreftuneError(f"--nproc must be at least 1, got {nproc}")
    if device not in ("cuda", "cpu"):
        raise PreftuneError(f"--device '{device}': choose cuda or cpu")
    cfg = load_estimate_config(source, overrides)
    shape = read_model_shape(cfg.model.model_name_or_path)
    s, precision = base_setting(cfg, device, nproc)
    multiple = cfg.training.row_length_multiple or (8 if s.cpu and s.amp else 1)
    batches = data_batches(cfg, multiple, nproc) if data else [worst_case_batch(cfg, pair_tokens, multiple)]
    ratio = cfg.training.per_device_eval_batch_size / cfg.training.per_device_train_batch_size  # precompute batches

    def worst(setting: Setting) -> tuple[Estimate, Batch]:
        evals = [Batch(max(1, round(b.rows * ratio)), b.row_len, round(b.scored * ratio), "") for b in batches]
        return max(((estimate(shape, setting, b, e), b) for b, e in zip(batches, evals)), key=lambda eb: eb[0].peak)

    unit, div = ("MiB", MiB) if s.cpu else ("GiB", GiB)
    trainable = shape.params if s.full else lora_params(shape, s)
    targets = "all linear layers" if s.lora_targets == LORA_ALL else ",".join(s.lora_targets)
    kind = "full fine-tuning" if s.full else f"LoRA r={s.lora_r} on {targets}"
    lines = [
        (f"model     {shape.params / 1e9:.3g}B parameters, {shape.layers} layers, hidden {shape.hidden}, "
         f"intermediate {shape.intermediate}, vocab {shape.vocab}{' (tied)' if shape.tied else ''}  [{shape.source}]"),
        f"training  {kind} ({trainable / 1e6:.1f}M trainable), {precision}, reference log-probs: {s.reference}"
        + (", stop_on_collapse keeps a host copy of the trainable weights" if s.keep_healthy else ""),
        (f"batch     {cfg.training.per_device_train_batch_size} pair(s) per device and micro-batch x "
         f"{s.accumulation} accumulation; {worst(s)[1].how}"),
        f"device    {device}, {nproc} process{'es' if nproc > 1 else ''}, {capacity / div:.0f} {unit} each"
        + (f"; the process runtime ({CPU_RUNTIME_MIB} MiB) is included" if s.cpu else
           f"; a CUDA context of {CUDA_CONTEXT_MIB} MiB is included (assumed)"),
        "",
        f"peak memory per device ({unit})         weights   grads   AdamW  activ.   other    peak  fits",
    ]  # fmt: skip
    modes = ["none", "full"] + (["selective"] if s.ckpt == "selective" else [])
    dists = ["single"] if nproc == 1 else ["ddp", "fsdp"] if s.full else ["ddp"]
    for dist in dists:
        for ckpt in modes:
            e, _ = worst(replace(s, dist=dist, ckpt=ckpt))
            mine = ckpt == s.ckpt and (dist == s.dist or not s.full)
            fits = "no" if e.peak > capacity else "tight" if e.peak + e.heap > 0.9 * capacity else "yes"
            fits += "" if e.phase == "training" else f" (peak: {e.phase})"
            if dist == "fsdp" and s.reference == "on the fly":
                fits = "n/a (preftune's fsdp needs precompute_ref_log_probs)"
            label = f"{'1 process' if dist == 'single' else dist:9s} "
            label += "no checkpointing" if ckpt == "none" else "checkpointing: " + ckpt
            cells = [e.weights, e.grads, e.optimizer, e.activations, e.other, e.peak]
            lines.append(f"{'*' if mine else ' '} {label:34s}" + "".join(f"{c / div:8.2f}" for c in cells)
                         + f"  {fits}")  # fmt: skip
    lines.append("* this config's setting. peak = the largest phase, not the column sum: backward frees activations "
                 "as gradients appear (docs/scaling.md).")  # fmt: skip
    if nproc > 1 and not s.full:
        lines.append("LoRA runs as ddp under distributed: fsdp (the frozen base is replicated): one set of rows.")
    if nproc > 1 and s.full and not s.cpu:
        lines.append(f"fsdp: each checkpoint (save_steps, end of run) gathers the whole weights and AdamW state into "
                     f"rank 0's host memory: {fsdp_gather(shape, s) / GiB:.1f} GiB of RAM on that machine")  # fmt: skip
    if s.cpu:
        lines.append(f"RSS on CPU: glibc keeps freed heap, up to {worst(s)[0].heap / div:.0f} {unit} more than the "
                     "peak (measured 0.3-1.5 x the activations; MALLOC_MMAP_THRESHOLD_=131072: the RSS follows "
                     "the tensors)")  # fmt: skip
    if not s.cpu:
        tflop = step_tflop(shape, s, worst(s)[1])
        seconds = tflop / (ASSUMED_MFU * H100_BF16_TFLOPS)
        lines.append(f"compute   {tflop:.3g} TFLOP per device and optimizer step: ~{seconds:.2g} s on an H100 at "
                     f"{ASSUMED_MFU:.0%} MFU (assumed, not measured)")  # fmt: skip
    return "\n".join(lines)
