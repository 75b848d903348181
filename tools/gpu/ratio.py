#!/usr/bin/env python3
"""kd / PyTorch throughput per workload and precision, from one card's two logs.

  python3 ratio.py KD_BENCH_LOG TORCH_THROUGHPUT_LOG

KD_BENCH_LOG: `kd-runner bench ... --precision f32,tf32,bf16 [--conv-algo heuristic,benchmark]
[--memory-format channels-first,channels-last]` (its `BENCH workload=... precision=...
images_per_s=... conv_algo=... memory_format=...` lines). TORCH_THROUGHPUT_LOG: `torch_ref.py throughput` (its final table:
fp32 with TF32 off, fp32 + TF32, bf16 autocast). Prints one Markdown table: each precision
against PyTorch's same precision, and each side's best against the other's best.
"""
import re
import sys

WORKLOADS = {  # kd bench key -> torch_ref row
    "resnet18-train": "R18 train",
    "resnet50-train": "R50 train",
    "resnet50-infer": "R50 inference",
    "kd-step": "KD R50->R18 step",
}
PRECISIONS = ["f32", "tf32", "bf16"]  # torch_ref's column order


def kd_figures(text):
    """(workload, precision) -> {(conv_algo, memory_format): images/s}; lines from before those
    keys existed count as heuristic and channels-first."""
    out = {}
    pat = (r"^BENCH workload=(\S+) precision=(\S+) images_per_s=([\d.]+)"
           r"(?: conv_algo=(\S+))?(?: memory_format=(\S+))?")
    for m in re.finditer(pat, text, re.M):
        variant = (m.group(4) or "heuristic", m.group(5) or "channels-first")
        out.setdefault((m.group(1), m.group(2)), {})[variant] = float(m.group(3))
    return out


def variant_label(precision, algo, fmt):
    """`bf16`, `bf16, cuDNN benchmark`, `bf16, channels-last`, ..."""
    parts = [precision]
    if algo != "heuristic":
        parts.append(f"cuDNN {algo}")
    if fmt != "channels-first":
        parts.append(fmt)
    return ", ".join(parts)


def torch_figures(text):
    out = {}
    for row in WORKLOADS.values():
        # The summary table's row: name | cell | cell | cell, each cell "images/s (ms)".
        for line in text.splitlines():
            if line.startswith(row) and "|" in line:
                cells = [c.strip() for c in line.split("|")[1:]]
                for p, c in zip(PRECISIONS, cells):
                    out[(row, p)] = float(c.split()[0])
    return out


def main(kd_log, torch_log):
    kd = kd_figures(open(kd_log).read())
    pt = torch_figures(open(torch_log).read())
    if not kd or not pt:
        sys.exit(f"no figures found: {len(kd)} kd rows in {kd_log}, {len(pt)} PyTorch cells in {torch_log}")
    print("| workload | precision | kd images/s | PyTorch images/s | kd / PyTorch |")
    print("|---|---|---|---|---|")
    for key, row in WORKLOADS.items():
        best_kd, best_pt = (0.0, ""), (0.0, "")
        for p in PRECISIONS:
            b = pt.get((row, p))
            if b is not None:
                best_pt = max(best_pt, (b, p))
            variants = kd.get((key, p), {}).items()
            for (algo, fmt), a in sorted(variants, key=lambda kv: (kv[0][0] != "heuristic", kv[0][1])):
                label = variant_label(p, algo, fmt)
                best_kd = max(best_kd, (a, label))
                if b is not None:
                    print(f"| {row} | {label} | {a:.0f} | {b:.0f} | {a / b:.2f}× |")
        if best_kd[0] and best_pt[0]:
            print(f"| {row} | best ({best_kd[1]} vs {best_pt[1]}) | {best_kd[0]:.0f} | {best_pt[0]:.0f} "
                  f"| **{best_kd[0] / best_pt[0]:.2f}×** |")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
