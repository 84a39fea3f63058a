"""Micro-benchmark: padded forward vs the fast path (shared prompt, packing, chunked LM head).

One policy step = forward + backward of sum(chosen logps - rejected logps) for 4 pairs with
~200-token prompts and ~40-token answers, fp32 and under bf16 autocast.

    python bench/fastpath_micro.py                 # tiny Llama + SmolLM2-135M, CPU
    python bench/fastpath_micro.py --models smollm2 --reps 5 --threads 1
    python bench/fastpath_micro.py --models smollm2-random --device cuda   # same shapes, random weights

Time: median of --reps steps after one warm-up, modes interleaved; wall time, and the process's
CPU time (steadier than wall time on a shared machine; use --threads 1 there). Memory: every (model, dtype,
mode) runs once in a fresh subprocess; CPU: peak RSS of the step above the RSS before it (the
high-water mark is reset through /proc/self/clear_refs); CUDA: torch.cuda.max_memory_allocated
above the allocation before the step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from preftune.batching import collate_padded  # noqa: E402
from preftune.forward import fast_path_mode, forward_fast, forward_padded, packed_token_count  # noqa: E402
from preftune.types import TokenizedPair  # noqa: E402

# mode -> max_tokens_per_row for forward_fast; "padded" = the simple path. Budget 1: one pair per
# row (prompt shared, rows padded to the longest pair; what None gives for these near-equal pairs)
MODES = {"padded": "-", "shared (1 pair/row)": 1, "packed (2 pairs/row)": 600, "packed (1 row)": 10**9}
SMOLLM2_CONFIG = dict(  # SmolLM2-135M's shapes, for --models smollm2-random (no download needed)
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)  # fmt: skip


def load_model(name: str, device: str):
    if name == "tiny":
        import tiny

        tok = tiny.make_tokenizer()
        return tiny.make_model(tok).to(device), tok.pad_token_id
    if name == "smollm2":
        from transformers import AutoModelForCausalLM

        from preftune.smollm2 import ensure_default_model

        model = AutoModelForCausalLM.from_pretrained(ensure_default_model(), dtype=torch.float32)
    else:  # smollm2-random
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_CONFIG))
    model.config.use_cache = False
    return model.float().eval().to(device), 2


def make_pairs(vocab: int, seed: int = 0) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(10, vocab, (n,), generator=g).tolist()

    shapes = [(185, 38, 44), (200, 45, 31), (207, 40, 40), (216, 33, 47)]  # ~200-token prompts, ~40-token answers
    return [TokenizedPair(ids(p), ids(c), ids(r)) for p, c, r in shapes]


def forward_mode(model, pairs, pad, mode, device, bf16):
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else nullcontext()
    with autocast:
        if mode == "padded":
            return forward_padded(model, collate_padded(pairs, pad).to(device))
        return forward_fast(model, pairs, pad_token_id=pad, max_tokens_per_row=MODES[mode])


def step(model, pairs, pad, mode, device, bf16):
    out = forward_mode(model, pairs, pad, mode, device, bf16)
    (out.chosen.logps - out.rejected.logps).sum().backward()
    model.zero_grad(set_to_none=True)
    return out


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def memory_child(model_name, mode, bf16, device) -> None:
    """Entry point of one memory subprocess: prints the step's peak MiB above the start."""
    model, pad = load_model(model_name, device)
    model.train()
    pairs = make_pairs(model.config.vocab_size)
    fast_path_mode(model)  # the one-time probe is not part of the step
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(model, pairs, pad, mode, device, bf16)
        peak = torch.cuda.max_memory_allocated() - before
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark
        before = rss_kib("VmRSS") * 1024
        step(model, pairs, pad, mode, device, bf16)
        peak = rss_kib("VmHWM") * 1024 - before
    print(json.dumps({"peak_mib": peak / 2**20}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="fp32 and/or bf16 (autocast)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "MODE", "BF16"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        memory_child(args.child[0], args.child[1], args.child[2] == "1", args.device)
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    for name in args.models.split(","):
        model, pad = load_model(name, args.device)
        model.train()
        pairs = make_pairs(model.config.vocab_size)
        padded_tokens = collate_padded(pairs, pad).input_ids.numel()
        print(f"\n## {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, path {fast_path_mode(model)}; "
              f"tokens fed: padded {padded_tokens}, fast {packed_token_count(pairs)}")  # fmt: skip
        for bf16 in [d == "bf16" for d in args.dtypes.split(",")]:
            with torch.no_grad():  # agreement check
                ref = step_outputs(model, pairs, pad, "padded", args.device, bf16)
                diff = max(
                    (step_outputs(model, pairs, pad, m, args.device, bf16) - ref).abs().max().item() for m in MODES if m != "padded"
                )  # fmt: skip
            times, cpu = {m: [] for m in MODES}, {m: [] for m in MODES}
            for m in MODES:  # warm-up
                step(model, pairs, pad, m, args.device, bf16)
            for _ in range(args.reps):
                for m in MODES:
                    sync(args.device)
                    t0, c0 = time.perf_counter(), time.process_time()
                    step(model, pairs, pad, m, args.device, bf16)
                    sync(args.device)
                    times[m].append(time.perf_counter() - t0)
                    cpu[m].append(time.process_time() - c0)
            base = statistics.median(times["padded"])
            print(f"### {'bf16 autocast' if bf16 else 'fp32'} (max |logps diff| vs padded: {diff:.2e})")
            print("| mode | fwd+bwd wall s (median) | speed-up | CPU s (median) | speed-up | peak MiB of the step |")
            print("|---|---|---|---|---|---|")
            cpu_base = statistics.median(cpu["padded"])
            for m in MODES:
                t, c = statistics.median(times[m]), statistics.median(cpu[m])
                mem = "-" if args.no_memory else f"{child_memory(name, m, bf16, args.device):.0f}"
                print(f"| {m} | {t:.3f} | {base / t:.2f}x | {c:.3f} | {cpu_base / c:.2f}x | {mem} |")


def step_outputs(model, pairs, pad, mode, device, bf16) -> torch.Tensor:
    out = forward_mode(model, pairs, pad, mode, device, bf16)
    return torch.cat([out.chosen.logps, out.rejected.logps]).float().cpu()


def child_memory(name, mode, bf16, device) -> float:
    cmd = [sys.executable, __file__, "--device", device, "--threads", str(torch.get_num_threads()),
           "--child", name, mode, "1" if bf16 else "0"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_mib"]


if __name__ == "__main__":
    main()
