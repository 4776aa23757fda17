#!/usr/bin/env python3
"""A compact Markdown table from `tokensieve bench --vlm --report DIR` (DIR/vlm_bench.json): per configuration the
visual tokens (LM input → kept to the end), time to first token with its min–max, the measured speed-up (wall and
CPU time) next to the analytic FLOPs speed-up and their ratio, the vision side's time and FLOPs speed-up, the
methods' own scoring time and the KV bytes.

  .venv/bin/python scripts/vlm_speed_table.py runs/vlmbench/vitl_all/vlm_bench.json [--budget 0.11]
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", help="vlm_bench.json")
    p.add_argument("--budget", default="", help="only the configurations at this budget (and full)")
    a = p.parse_args()
    with open(a.report, encoding="utf-8") as f:
        data = json.load(f)
    rows = [s for s in data["summary"] if s["label"] == "full" or not a.budget or s["label"].endswith(":" + a.budget)]
    print(
        "| config | visual tokens (LM in → end) | TTFT s (min–max) | TTFT speed-up | CPU-time speed-up | "
        "FLOPs speed-up | measured / FLOPs | vision s | vision FLOPs speed-up | scoring ms | KV MiB |"
    )
    print("|" + "---|" * 11)
    for s in rows:
        ratio = s["cpu_speedup"] / s["flops_speedup"]
        print(
            f"| {s['label']} | {s['visual_tokens']} → {s['kept_tokens']} | {s['ttft_s']:.2f} "
            f"({s['ttft_s_min']:.2f}–{s['ttft_s_max']:.2f}) | {s['ttft_speedup']:.2f}× | {s['cpu_speedup']:.2f}× | "
            f"{s['flops_speedup']:.2f}× | {ratio:.2f} | {s['vision_s']:.2f} | {s['vision_flops_speedup']:.2f}× | "
            f"{1e3 * s['score_s']:.1f} | {s['kv_bytes'] / 2**20:.1f} |"
        )


if __name__ == "__main__":
    main()
