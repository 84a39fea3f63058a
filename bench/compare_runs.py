"""Compare two runs of the same recipe (e.g. 1 process vs torchrun at 2 ranks): logged metrics,
held-out results, throughput and peak memory.   python bench/compare_runs.py RUN_A RUN_B"""

import json
import sys
from pathlib import Path


def main(a: Path, b: Path) -> None:
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    ha, hb = (json.loads((d / "log_history.json").read_text()) for d in (a, b))
    worst = 0.0
    for ra, rb in zip(ha, hb):
        for key, value in ra.items():
            if key != "tokens_per_second" and isinstance(value, (int, float)) and isinstance(rb.get(key), (int, float)):
                worst = max(worst, abs(value - rb[key]))
    print(f"| | {a.name} | {b.name} |\n|---|---|---|")
    print(f"| world size | {sa.get('world_size', 1)} | {sb.get('world_size', 1)} |")
    print(f"| training seconds (loop) | {sa['train_seconds']} | {sb['train_seconds']} |")
    print(f"| tokens/s (P+C+R) | {sa['tokens_per_second']} | {sb['tokens_per_second']} |")
    print(f"| peak RSS MB (fullest rank) | {sa['peak_rss_mb']} | {sb['peak_rss_mb']} |")
    ea, eb = (json.loads((d / "eval.json").read_text()) for d in (a, b))
    for side in ("policy", "reference"):
        for metric in ("accuracy_sum", "accuracy_mean", "chosen_logps", "rejected_logps"):
            print(f"| held-out {side} {metric} | {ea['scores'][side][metric]:.6g} | {eb['scores'][side][metric]:.6g} |")
    for key, value in ea["scores"].items():
        if isinstance(value, (int, float)) and key not in ("pairs", "scored"):
            print(f"| held-out {key} | {value:.6g} | {eb['scores'][key]:.6g} |")
    print(f"\nthroughput ratio ({b.name} / {a.name}, loop seconds): {sa['train_seconds'] / sb['train_seconds']:.3f}")
    print(f"log rows: {len(ha)} vs {len(hb)}; largest difference of a logged value: {worst:.2e}")
    after_a, after_b = ([g["after"] for g in e.get("generations", [])] for e in (ea, eb))
    same = sum(x == y for x, y in zip(after_a, after_b))
    print(f"held-out answers of the trained models identical: {same} of {len(after_a)}")

if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
