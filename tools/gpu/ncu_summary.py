#!/usr/bin/env python3
"""Where a training step's GPU time goes, from Nsight Compute's per-kernel durations.

  python3 ncu_summary.py NCU_CSV [STEPS]

NCU_CSV: the output of `ncu --csv --metrics gpu__time_duration.sum PROGRAM ...` (lines that are not
CSV, the program's own output, are skipped; ncu's "details" layout, one row per kernel and metric
with `Metric Name` / `Metric Value` columns, and its "raw" layout, one column per metric, are both
read). STEPS: how many steps the profiled program ran, to print milliseconds per step.

Prints the kernels by total time (count, total, share) and the time per family: kd's own kernels
(bn_*, max_pool_*, augment_*, sgd_*), cuDNN's and cuBLAS's (xmma, cutlass, sm90/sm80 names,
implicit/winograd/fft, gemm), and candle's element-wise, reduction, copy and cast kernels.
"""
import csv
import re
import sys
from collections import defaultdict

METRIC = "gpu__time_duration.sum"

FAMILIES = [  # (family, pattern on the kernel name), first match wins
    ("kd BatchNorm", r"^bn_"),
    ("kd max-pool", r"^max_pool_"),
    ("kd augmentation", r"^augment_"),
    ("kd SGD", r"^sgd_"),
    ("cuDNN / cuBLAS convolution and matmul",
     r"xmma|cutlass|sm\d\d_|implicit|winograd|fft|gemm|conv|wgrad|dgrad|cudnn|nchw|nhwc"),
    ("candle copy / cast", r"copy|cast|to_|contiguous"),
    ("candle reduction", r"reduce|sum|max|min|argm|softmax|logsumexp"),
    ("candle fill", r"fill|zero|const_set"),
    ("candle element-wise", r"^[bu]?(add|sub|mul|div|affine|neg|exp|log|sqrt|sqr|relu|gelu|ge|gt|le|lt|eq|ne|where|powf|elu|tanh|abs|recip|minimum|maximum|clamp)"),
]


def family(name):
    for fam, pat in FAMILIES:
        if re.search(pat, name, re.I):
            return fam
    return "other"


def durations(path):
    """(kernel name, duration in ns) per profiled kernel launch."""
    lines = [l for l in open(path, encoding="utf-8", errors="replace") if l.startswith('"')]
    if not lines:
        sys.exit(f"{path}: no CSV lines (did ncu run? see the file for its messages)")
    rows = list(csv.reader(lines))
    header, body = rows[0], rows[1:]
    col = {h: i for i, h in enumerate(header)}
    name_col = col.get("Kernel Name") or col.get("Function Name")
    if name_col is None:
        sys.exit(f"{path}: no 'Kernel Name' column in {header[:12]}")
    scale = {"nsecond": 1.0, "ns": 1.0, "usecond": 1e3, "us": 1e3, "msecond": 1e6, "ms": 1e6,
             "second": 1e9, "s": 1e9}
    out = []
    if "Metric Name" in col:  # details layout
        for r in body:
            if len(r) < len(header) or r[col["Metric Name"]] != METRIC:
                continue
            unit = r[col["Metric Unit"]] if "Metric Unit" in col else "nsecond"
            v = float(r[col["Metric Value"]].replace(",", "")) * scale.get(unit, 1.0)
            out.append((r[name_col], v))
    elif METRIC in col:  # raw layout; its first body row may hold the units
        unit = "nsecond"
        for r in body:
            if len(r) < len(header):
                continue
            cell = r[col[METRIC]].replace(",", "")
            try:
                v = float(cell)
            except ValueError:
                unit = cell or unit
                continue
            out.append((r[name_col], v * scale.get(unit, 1.0)))
    else:
        sys.exit(f"{path}: neither a 'Metric Name' nor a '{METRIC}' column")
    return out


def main(path, steps=1):
    d = durations(path)
    total = sum(v for _, v in d)
    if total <= 0:
        sys.exit(f"{path}: no kernel durations")
    by_name = defaultdict(lambda: [0, 0.0])
    by_family = defaultdict(lambda: [0, 0.0])
    for name, v in d:
        short = name.split("(")[0].strip()
        by_name[short][0] += 1
        by_name[short][1] += v
        by_family[family(short)][0] += 1
        by_family[family(short)][1] += v
    ms = lambda ns: ns / 1e6 / steps
    print(f"{len(d)} kernel launches, {ms(total):.2f} ms of kernel time per step ({steps} step(s) profiled)\n")
    print("| family | launches per step | ms per step | share |\n|---|---|---|---|")
    for fam, (n, v) in sorted(by_family.items(), key=lambda kv: -kv[1][1]):
        print(f"| {fam} | {n / steps:.1f} | {ms(v):.3f} | {100 * v / total:.1f}% |")
    print("\n| kernel | launches per step | ms per step | share |\n|---|---|---|---|")
    for name, (n, v) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:40]:
        print(f"| `{name[:90]}` | {n / steps:.1f} | {ms(v):.3f} | {100 * v / total:.1f}% |")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) == 3 else 1.0)
