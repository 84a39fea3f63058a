"""preftune vs TRL 1.16's DPOTrainer: same model, data, hyperparameters and optimizer steps.

    python bench/vs_trl.py                       # all cases, CPU, 2 threads (case a alone: 25 min on 2 cores)
    python bench/vs_trl.py --from-json bench/results/vs_trl_cpu_2026-11-21_session5_case_a.json   # a saved run
    python bench/vs_trl.py --cases a --finetuning lora --precisions bf16 --steps 4   # quick look

Cases (SmolLM2-135M-Instruct, chat template applied by both frameworks, no truncation):
  a      the shipped sycophancy pairs (batch 4, max_length 256)
  b      long prompts: multi-turn histories of 500+ tokens before the last question (batch 4)
  c      prompt-length sweep: one long user message of P = 128 ... 2048 tokens, short answers (batch 2)

Every run is a fresh subprocess (its own peak RSS), TRL and preftune alternate, and each
preftune run gets an empty $PREFTUNE_HOME so its reference log-probs are computed, not reused.
Both train one epoch over exactly steps x batch pairs, lr 5e-6 linear, beta 0.1, sigmoid loss,
AdamW, LoRA r16/alpha 32 on every linear layer or full fine-tuning.

Timed: TRL from on_train_begin to the last on_step_end (its reference forward runs inside the
steps); preftune the reference precompute plus the training loop. Throughput counts the same
tokens for both: prompt+chosen plus prompt+rejected of every pair, as the chat template gives them.
Model loading and dataset tokenization are outside the timing for both; peak RSS covers the whole
process, preftune's saving of final/ and its report included (TRL saves nothing). Ratios at the
same precision: against TRL's faster setting (the issue's baseline: whichever TRL setting ran
faster in that run), against TRL with the same checkpointing setting as the preftune row, and the
memory against TRL's lowest-memory setting whatever its speed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the environment as the user started us: importing preftune (the driver does, for the model
# path) sets allocator/cache defaults of its own, which TRL's workers must not inherit
USER_ENV = dict(os.environ)
SYCOPHANCY = ROOT / "examples" / "data" / "sycophancy" / "train.jsonl"
SWEEP = (128, 256, 512, 1024, 2048)
LR, BETA, LORA_R, LORA_ALPHA, SEED = 5e-6, 0.1, 16, 32, 42


# ---------------------------------------------------------------- data
def conversational(prompt_messages: list[dict], chosen: str, rejected: str) -> dict:
    return {
        "prompt": prompt_messages,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def sycophancy_rows() -> list[dict]:
    return [json.loads(line) for line in SYCOPHANCY.read_text().splitlines() if line.strip()]


def prompt_tokens(tokenizer, messages: list[dict]) -> int:
    return len(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False))


def case_pairs(case: str, n: int, tokenizer, prompt_len: int | None = None) -> list[dict]:
    rows = sycophancy_rows()
    if case == "a":
        return [conversational([{"role": "user", "content": r["prompt"]}], r["chosen"], r["rejected"]) for r in rows[:n]]
    if case == "b":  # earlier turns of other pairs (user claim, assistant correction) until 500+ tokens
        pairs = []
        for i in range(n):
            last = rows[(7 * i) % len(rows)]
            history: list[dict] = []
            k = i
            while prompt_tokens(tokenizer, history + [{"role": "user", "content": last["prompt"]}]) < 500:
                turn = rows[(13 * k + 5) % len(rows)]
                history += [{"role": "user", "content": turn["prompt"]}, {"role": "assistant", "content": turn["chosen"]}]
                k += 1
            pairs.append(conversational(history + [{"role": "user", "content": last["prompt"]}], last["chosen"],
                                        last["rejected"]))  # fmt: skip
        return pairs
    if case == "c":  # a document of the right length, then the question
        corpus = tokenizer(" ".join(r["chosen"] for r in rows), add_special_tokens=False)["input_ids"]
        pairs = []
        for i in range(n):
            last = rows[(11 * i + 3) % len(rows)]

            def message(doc_tokens: int) -> list[dict]:
                start = (977 * i) % (len(corpus) - doc_tokens - 1)
                doc = tokenizer.decode(corpus[start : start + doc_tokens])
                return [{"role": "user", "content": f"Read this first.\n\n{doc}\n\nNow: {last['prompt']}"}]

            doc_len = max(1, prompt_len - prompt_tokens(tokenizer, message(1)))
            while doc_len > 1 and prompt_tokens(tokenizer, message(doc_len)) > prompt_len:
                doc_len -= 1
            pairs.append(conversational(message(doc_len), last["chosen"], last["rejected"]))
        return pairs
    raise ValueError(case)


def token_counts(tokenizer, pairs: list[dict]) -> dict:
    """Tokens as the simple path sees them: (P + C) + (P + R) per pair, and P + C + R."""
    simple = shared = prompt = 0
    for p in pairs:
        prompt_ids = tokenizer.apply_chat_template(p["prompt"], tokenize=True, add_generation_prompt=True,
                                                   return_dict=False)  # fmt: skip
        chosen = len(tokenizer.apply_chat_template(p["prompt"] + p["chosen"], tokenize=True, return_dict=False))
        rejected = len(tokenizer.apply_chat_template(p["prompt"] + p["rejected"], tokenize=True, return_dict=False))
        simple += chosen + rejected
        shared += chosen + rejected - len(prompt_ids)
        prompt += len(prompt_ids)
    return {"tokens": simple, "tokens_shared": shared, "prompt_tokens_mean": prompt / len(pairs)}


# ---------------------------------------------------------------- one run (in a subprocess)
def run_trl(spec: dict, model_path: str, pairs: list[dict], workdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Clock(TrainerCallback):
        def __init__(self):
            self.begin, self.ends = None, []

        def on_train_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    peft_config = None
    if spec["finetuning"] == "lora":
        peft_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")  # fmt: skip
    args = DPOConfig(
        output_dir=str(workdir / "trl"), learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0,
        per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1, num_train_epochs=1,
        beta=BETA, loss_type=["sigmoid"], max_length=spec["max_length"], bf16=spec["precision"] == "bf16",
        gradient_checkpointing=spec["trl_gc"], logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        seed=SEED, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[clock := Clock()])  # fmt: skip
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {"seconds": clock.ends[-1] - clock.begin, "steps": len(clock.ends), "step1_loss": losses[0],
            "step_seconds": [b - a for a, b in zip([clock.begin] + clock.ends, clock.ends)]}  # fmt: skip


def run_preftune(spec: dict, model_path: str, pairs: list[dict], workdir: Path) -> dict:
    os.environ["PREFTUNE_HOME"] = str(workdir / "home")  # fresh: the reference log-probs are computed
    from preftune import train

    data = workdir / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    summary = train({
        "model_name_or_path": model_path, "train_file": str(data), "max_length": spec["max_length"],
        "finetuning_type": spec["finetuning"], "lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0,
        "loss_type": "sigmoid", "beta": BETA, "learning_rate": LR, "lr_scheduler_type": "linear",
        "per_device_train_batch_size": spec["batch"],
        "gradient_accumulation_steps": 1, "num_train_epochs": 1, "bf16": spec["precision"] == "bf16",
        "logging_steps": 1, "seed": SEED, "progress": False, "output_dir": str(workdir / "preftune"),
        "gradient_checkpointing": spec.get("preftune_gc") or False,  # false, true (full) or "selective"
    })  # fmt: skip
    history = json.loads((workdir / "preftune" / "log_history.json").read_text())
    losses = [row["loss"] for row in history if "loss" in row]
    return {"seconds": summary["reference_seconds"] + summary["train_seconds"], "steps": summary["steps"],
            "step1_loss": losses[0], "reference_seconds": summary["reference_seconds"]}  # fmt: skip


def worker(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    pairs = case_pairs(spec["case"], spec["steps"] * spec["batch"], tokenizer, spec.get("prompt_len"))
    with tempfile.TemporaryDirectory(prefix="vs_trl-") as tmp:
        run = run_trl if spec["framework"] == "trl" else run_preftune
        result = run(spec, spec["model_path"], pairs, Path(tmp))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result.update(token_counts(tokenizer, pairs))
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- driver
def launch(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env={**USER_ENV, "TOKENIZERS_PARALLELISM": "false"})  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"run failed: {spec}")
    return {**spec, **json.loads(lines[-1][len("RESULT ") :])}


def label(r: dict) -> str:
    if r["framework"] == "preftune":
        gc = r.get("preftune_gc")
        return "preftune" + (" +selective ckpt" if gc == "selective" else " +ckpt" if gc else "")
    return "TRL" + (" +ckpt" if r["trl_gc"] else "")


def summarize(group: list[dict]) -> list[dict]:
    """Median over repeats per setting; then ratios against TRL's best."""
    settings: dict[str, list[dict]] = {}
    for r in group:
        settings.setdefault(label(r), []).append(r)
    rows = []
    for name, runs in settings.items():
        secs = statistics.median(r["seconds"] for r in runs)
        r0 = runs[0]
        rows.append({
            "setting": name, "seconds": secs, "s_per_step": secs / r0["steps"],
            "pairs_per_s": r0["steps"] * r0["batch"] / secs, "tokens_per_s": r0["tokens"] / secs,
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs), "step1_loss": r0["step1_loss"],
            "runs": len(runs), "prompt_tokens_mean": r0["prompt_tokens_mean"],
        })  # fmt: skip
    trl = [r for r in rows if r["setting"].startswith("TRL")]
    if trl:
        faster = max(trl, key=lambda r: r["pairs_per_s"])
        leanest = min(trl, key=lambda r: r["peak_rss_mb"])
        for ours in (r for r in rows if r["setting"].startswith("preftune")):
            ours["vs_faster"] = faster["setting"]  # the baseline: TRL's faster setting
            ours["speedup"] = ours["pairs_per_s"] / faster["pairs_per_s"]
            ours["memory_ratio"] = ours["peak_rss_mb"] / faster["peak_rss_mb"]
            same = next((r for r in trl if r["setting"].endswith("ckpt") == ours["setting"].endswith("ckpt")), None)
            if same is not None:  # like for like: both with (or both without) gradient checkpointing
                ours["vs_same"] = same["setting"]
                ours["speedup_same"] = ours["pairs_per_s"] / same["pairs_per_s"]
                ours["memory_ratio_same"] = ours["peak_rss_mb"] / same["peak_rss_mb"]
            ours["vs_leanest"] = leanest["setting"]
            ours["memory_ratio_leanest"] = ours["peak_rss_mb"] / leanest["peak_rss_mb"]
    return rows


def _ratios(r: dict) -> list[str]:
    if "speedup" not in r:
        return [""] * 4
    same = (f"{r['speedup_same']:.2f}x / {r['memory_ratio_same']:.2f}x vs {r['vs_same']}" if "vs_same" in r else "")
    return [f"{r['speedup']:.2f}x vs {r['vs_faster']}", f"{r['memory_ratio']:.2f}x vs {r['vs_faster']}", same,
            f"{r['memory_ratio_leanest']:.2f}x vs {r['vs_leanest']}"]  # fmt: skip


RATIO_HEADER = ("throughput ratio vs TRL's faster setting | memory ratio vs TRL's faster setting | throughput / memory vs TRL with the same "
                "checkpointing | memory vs TRL's leanest")


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n### {title}\n")
    print(f"| setting | s/step | pairs/s | tokens/s | peak RSS MB | step-1 loss | {RATIO_HEADER} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratios = " | ".join(_ratios(r))
        print(f"| {r['setting']} | {r['s_per_step']:.2f} | {r['pairs_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['peak_rss_mb']:.0f} | {r['step1_loss']:.4f} | {ratios} |", flush=True)  # fmt: skip


def print_summary(groups: list[tuple[str, list[dict]]]) -> None:
    print("\n## Summary\n")
    print("| case | fine-tuning | precision | prompt tokens | TRL's faster setting: s/step, peak MB | preftune | "
          f"preftune s/step | preftune peak MB | {RATIO_HEADER} |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for title, runs in groups:
        rows = summarize(runs)
        case, ft, precision = title.rsplit(", ", 2)
        for ours in (r for r in rows if r["setting"].startswith("preftune")):
            faster = next(r for r in rows if r["setting"] == ours["vs_faster"])
            print(f"| {case} | {ft} | {precision} | {ours['prompt_tokens_mean']:.0f} | {faster['s_per_step']:.2f}, "
                  f"{faster['peak_rss_mb']:.0f} ({faster['setting']}) | {ours['setting']} | {ours['s_per_step']:.2f} | "
                  f"{ours['peak_rss_mb']:.0f} | {' | '.join(_ratios(ours))} |")  # fmt: skip
    sweep = [(title, runs) for title, runs in groups if title.startswith("(c)")]
    if sweep:
        print("\n## (c) cost against prompt length: seconds per 1000 tokens of P+C+R and of 2P+C+R\n")
        print("| prompt tokens P | preftune s/pair | TRL s/pair | preftune s per 1k (P+C+R) | TRL s per 1k (P+C+R) | "
              "preftune s per 1k (2P+C+R) | TRL s per 1k (2P+C+R) |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for title, runs in sweep:
            by = {label(r): r for r in runs}
            ours, trl = by.get("preftune"), next((r for k, r in by.items() if k.startswith("TRL")), None)
            if ours is None or trl is None:
                continue
            pairs = ours["steps"] * ours["batch"]
            print(f"| {ours['prompt_tokens_mean']:.0f} | {ours['seconds'] / pairs:.2f} | {trl['seconds'] / pairs:.2f} | "
                  f"{1000 * ours['seconds'] / ours['tokens_shared']:.2f} | {1000 * trl['seconds'] / trl['tokens_shared']:.2f} | "
                  f"{1000 * ours['seconds'] / ours['tokens']:.2f} | {1000 * trl['seconds'] / trl['tokens']:.2f} |")  # fmt: skip


def group_title(r: dict) -> str:
    title = {"a": "(a) sycophancy pairs", "b": "(b) long prompts (500+ tokens)",
             "c": f"(c) prompt length {r['prompt_len']}"}[r["case"]]  # fmt: skip
    return f"{title}, {r['finetuning']}, {r['precision']}"


PREFTUNE_CKPT = {"off": False, "on": True, "selective": "selective"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="a,b,c")
    ap.add_argument("--finetuning", default="lora,full")
    ap.add_argument("--precisions", default="auto", help="bf16 (autocast, both) and/or fp32 for case a; b and c "
                    "run the first one. auto: bf16,fp32 on a CPU with native bf16, else fp32 (emulated bf16 "
                    "matmuls run ~100x slower there, for both frameworks)")  # fmt: skip
    ap.add_argument("--trl-ckpt", default="on,off", help="TRL gradient checkpointing settings to run under bf16 "
                    "(TRL's default is on); fp32 runs TRL without it, its faster fp32 setting")  # fmt: skip
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps for cases a and b (c: --sweep-steps)")
    ap.add_argument("--sweep-steps", type=int, default=2)
    ap.add_argument("--sweep", default=",".join(map(str, SWEEP)))
    ap.add_argument("--sweep-finetuning", default="lora")
    ap.add_argument("--sweep-trl-ckpt", default="off", help="TRL checkpointing in the sweep (off: its faster "
                    "bf16 setting in case a)")  # fmt: skip
    ap.add_argument("--preftune-ckpt", default="off,selective,on", help="preftune gradient checkpointing settings "
                    "to run in case a: off, selective, on (full)")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=1, help="alternating TRL/preftune runs per setting, cases a and b "
                    "(the median counts)")  # fmt: skip
    ap.add_argument("--from-json", help="print the tables of a saved --json file instead of running")
    ap.add_argument("--sweep-repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write every run's result here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.from_json:
        groups: list[tuple[str, list[dict]]] = []
        saved = json.loads(Path(args.from_json).read_text())
        machine = saved[0].get("machine") if saved else None
        print(f"machine: {machine}" if machine else "machine: not recorded (runs before session 7)")
        for r in saved:
            if not groups or groups[-1][0] != group_title(r):
                groups.append((group_title(r), []))
            groups[-1][1].append(r)
        for title, runs in groups:
            print_table(title, summarize(runs))
        print_summary(groups)
        return

    sys.path.insert(0, str(ROOT / "src"))
    from preftune.smollm2 import ensure_default_model

    model_path = str(ensure_default_model())
    import torch
    import transformers
    import trl

    from preftune.hardware import cpu_info

    cpu = cpu_info()
    precisions_all = args.precisions.split(",")
    if precisions_all == ["auto"]:
        precisions_all = ["bf16", "fp32"] if cpu.native_bf16 else ["fp32"]
    machine = {"cpu_model": cpu.model, "cpu_native_bf16": cpu.native_bf16, "cpu_bf16_flags": cpu.bf16_flags,
               "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}  # fmt: skip
    print(f"CPU {cpu.model}, native bf16: {', '.join(cpu.bf16_flags) or 'no'}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, trl {trl.__version__}, {args.threads} threads, "
          f"{os.cpu_count()} CPUs; precisions {','.join(precisions_all)}")  # fmt: skip
    ckpt = [s == "on" for s in args.trl_ckpt.split(",")]
    base = {"model_path": model_path, "threads": args.threads, "machine": machine}
    groups = []
    for case in args.cases.split(","):
        fts = args.sweep_finetuning.split(",") if case == "c" else args.finetuning.split(",")
        precisions = precisions_all if case == "a" else precisions_all[:1]
        lengths = [int(x) for x in args.sweep.split(",")] if case == "c" else [None]
        for ft in fts:
            for precision in precisions:
                for prompt_len in lengths:
                    spec = {**base, "case": case, "finetuning": ft, "precision": precision, "prompt_len": prompt_len,
                            "batch": 2 if case == "c" else 4, "steps": args.sweep_steps if case == "c" else args.steps,
                            "max_length": {"a": 256, "b": 1024, "c": (prompt_len or 0) + 256}[case]}  # fmt: skip
                    gcs = ckpt if precision == "bf16" else [False]
                    if case == "c":
                        gcs = [s == "on" for s in args.sweep_trl_ckpt.split(",")]
                    trl_specs = [{**spec, "framework": "trl", "trl_gc": gc} for gc in gcs]
                    runs = []
                    # alternate, and swap who goes first each repeat
                    for rep in range(args.sweep_repeats if case == "c" else args.repeats):
                        pgcs = [PREFTUNE_CKPT[s] for s in args.preftune_ckpt.split(",")] if case == "a" else [False]
                        order = trl_specs + [{**spec, "framework": "preftune", "trl_gc": None, "preftune_gc": gc}
                                             for gc in pgcs]  # fmt: skip
                        for s in order if rep % 2 == 0 else order[::-1]:
                            started = time.time()
                            runs.append(launch(s))
                            print(f"  {case} {ft} {precision} P={prompt_len} {label(runs[-1])}: "
                                  f"{runs[-1]['seconds']:.1f}s train, {runs[-1]['peak_rss_mb']:.0f} MB "
                                  f"({time.time() - started:.0f}s wall)", file=sys.stderr, flush=True)  # fmt: skip
                    groups.append((group_title(spec), runs))
                    print_table(groups[-1][0], summarize(runs))

    print_summary(groups)
    if args.json:
        Path(args.json).write_text(json.dumps([r for _, runs in groups for r in runs], indent=1))


if __name__ == "__main__":
    main()
