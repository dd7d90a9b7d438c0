"""The GPU report in one command: the test suite on the GPU and the GPU benchmarks, as one markdown table.

    bash bench/gpu_report.sh [OUT_DIR] [--only tests,sft_1b,...] [--budget SECONDS] [--pytest-args "-n 8"]
    bash bench/gpu_report.sh OUT_DIR --table-only      (default OUT_DIR: bench/gpu_report_out)

The table is OUT_DIR/report.md. `--only` runs some parts and builds the table from every result already in
OUT_DIR, so a report can be gathered over several shorter runs on a machine whose calls are time-limited;
`--budget` bounds the whole run's wall time (a part that no longer fits is not started, and says so in its log);
`--table-only` builds the table from an OUT_DIR gathered elsewhere, on any machine.

Whoever is lent a GPU runs it first: GPU figures are rare. On a machine without CUDA it says so in one line and
exits 0. Each benchmark runs in its own process (an out-of-memory in one leaves the others standing) and writes
JSON; the table is built from those files, and a benchmark that failed is a row saying so, not a missing row.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIN_PART_S = 30  # a part is not started with less of the --budget left than this
BF16 = ["--device", "cuda", "--dtype", "bfloat16"]
# name -> (what it measures, arguments of `python`); each benchmark also gets `--json OUT_DIR/<name>.json`.
BENCHMARKS = {
    "sft_1b": ("SFT step, LoRA r=16, 1B shape, 8 x 512 tokens, bf16 autocast",
               ["bench/train.py", *BF16, "--shape", "1b", "--batch", "8", "--seq", "512", "--steps", "5"]),
    "dpo_1b": ("DPO step, LoRA r=16, 1B shape, 4 pairs x 512 tokens, precomputed reference",
               ["bench/dpo.py", *BF16, "--shape", "1b", "--batch", "4", "--seq", "512", "--steps", "5"]),
    "sampling": ("greedy generation, 135M shape, 128 new tokens, batch 1 / 8 / 64",
                 ["bench/sampling.py", *BF16, "--batch-sizes", "1", "8", "64", "--workloads", "micro"]),
    "sampling_eager": ("the same with our decode step eager: what the CUDA graph buys",
                       ["bench/sampling.py", *BF16, "--batch-sizes", "1", "8", "64", "--workloads", "micro",
                        "--cuda-graphs", "off"]),
    "workloads": ("real workloads on the packaged SmolLM2: self-refine sampling, greedy evaluation",
                  ["bench/sampling.py", *BF16, "--workloads", "selfrefine", "eval"]),
    "lora_7b": ("SFT step, LoRA r=16, 7B shape, 1 x 1024 tokens, gradient checkpointing (peak memory)",
                ["bench/train.py", *BF16, "--shape", "7b", "--batch", "1", "--seq", "1024", "--steps", "2",
                 "--gradient-checkpointing"]),
}


def run(argv: list[str], log: Path, timeout: float) -> tuple[int, float]:
    """(exit code, seconds) of `python argv...`, its output kept in `log`."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run([sys.executable, *argv], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - t0


def timed_run(argv: list[str], log: Path, timeout: float, deadline: float) -> str:
    """Run one part within its own timeout and the report's deadline (time.perf_counter()); what became of it."""
    left = deadline - time.perf_counter()  # inf without a --budget
    if left < MIN_PART_S:
        log.write_text(f"not run: {max(left, 0):.0f} s of the --budget left, under {MIN_PART_S} s\n")
        return "not run (out of --budget)"
    rc, secs = run(argv, log, min(timeout, left))
    return f"{'ok' if rc == 0 else 'timed out' if rc == 124 else f'failed (exit {rc})'} ({secs:.0f} s)"


def suite_summary(log_text: str) -> str:
    """pytest's closing counts ("650 passed, 1 skipped in 90s"), or what is known without them."""
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed|error).*?) in [\d.]+s", log_text, re.M)
    return found[-1] if found else "no pytest summary (see the log)"


def _fmt(v: float | None, unit: str = "", digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}{unit}"


def rows(name: str, result: dict | None, what: str) -> list[str]:
    """The table rows of one benchmark's JSON (None: no result: it failed, timed out or was not run)."""
    if result is None:
        return [f"| {what} | no result (see {name}.log) | | | |"]
    if name in ("sampling", "sampling_eager"):
        step = "eager step" if name == "sampling_eager" else "CUDA graph"
        out = []
        for b in sorted({r["batch"] for r in result["rows"]}):
            ours, hf = (next(r for r in result["rows"] if r["batch"] == b and r["impl"] == i)
                        for i in ("ours", "transformers"))
            out.append(f"| greedy generation, 135M shape, batch {b}, {step} | {_fmt(ours['new tok/s'], ' tok/s')} | "
                       f"{_fmt(hf['new tok/s'], ' tok/s')} | {ours['new tok/s'] / hf['new tok/s']:.2f} | decode "
                       f"{_fmt(ours['decode ms/step'], ' ms/step', 2)} vs floor {_fmt(ours['floor ms/step'], ' ms', 2)} |")
        return out
    if name == "workloads":
        out = []
        for w, ratio in result["workload_ratios"].items():
            rows_w = [r for r in result["workloads"] if r["workload"] == w]
            best = min(rows_w[1:], key=lambda r: r["s"])
            out.append(f"| {w} workload (ours {rows_w[0]['batch']} slots; transformers best batch {best['batch']}) | "
                       f"{_fmt(rows_w[0]['s'], ' s')} | {_fmt(best['s'], ' s')} | {ratio:.2f} | "
                       f"{_fmt(rows_w[0]['GFLOP/s'], ' GFLOP/s')} of {_fmt(result['matmul_ceiling_gflops'])} ceiling |")
        return out
    ours, peer = result["rows"][0], result["rows"][-1]  # the ratio's numerator comes first, the peer last
    extra = f"MFU {_fmt(ours['MFU %'], '%')}, peak {_fmt(ours['peak GiB'], ' GiB')} (peer {_fmt(peer['peak GiB'], ' GiB')})"
    return [f"| {what} | {_fmt(ours['ms/step'], ' ms')} | {_fmt(peer['ms/step'], ' ms')} | "
            f"{result['ratio_vs_hf']:.2f} | {extra} |"]


def table(results: dict[str, dict | None], suite: str, device: str) -> str:
    lines = [f"GPU report: {device}; test suite on the GPU: {suite}", "",
             "| benchmark | ours | transformers (+peft) | ratio | notes |", "|---|---:|---:|---:|---|"]
    for name, (what, _) in BENCHMARKS.items():
        lines += rows(name, results.get(name), what)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    import torch

    ap = argparse.ArgumentParser(description="The GPU report: the test suite and the GPU benchmarks.")
    ap.add_argument("out", nargs="?", type=Path, default=REPO / "bench" / "gpu_report_out")
    ap.add_argument("--only", default=",".join(["tests", *BENCHMARKS]),
                    help="comma-separated parts to run (tests and/or benchmark names); the others are read "
                         "from OUT_DIR if an earlier run left them there")
    ap.add_argument("--budget", type=float, default=float("inf"),
                    help="seconds for the whole run: each part's timeout is cut to what is left, and a part with "
                         f"under {MIN_PART_S} s left is not started (default: no limit)")
    ap.add_argument("--pytest-args", default="", help='extra pytest arguments for the suite, e.g. "-n 8" '
                    "(pytest-xdist) on a many-core machine")
    ap.add_argument("--table-only", action="store_true",
                    help="run nothing: build OUT_DIR/report.md from the results already there, on any machine "
                         "(parts run by calls that landed on different machines, their folders merged)")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    unknown = only - {"tests", *BENCHMARKS}
    if unknown:
        ap.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}; known: tests, {', '.join(BENCHMARKS)}")
    out: Path = args.out
    if args.table_only:
        if not out.is_dir():
            ap.error(f"--table-only: {out} is not a folder of results")
        device_file = out / "device.txt"
        print(write_table(out, device_file.read_text().strip() if device_file.exists() else "device not recorded"))
        return 0
    if not torch.cuda.is_available():
        print("gpu_report: no CUDA device on this machine; nothing to measure (run it where a GPU is lent)")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    device = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    (out / "device.txt").write_text(device + "\n")
    deadline = time.perf_counter() + args.budget
    if "tests" in only:
        what = timed_run(["-m", "pytest", "-q", "-rs", *shlex.split(args.pytest_args)], out / "tests.log", 1800,
                         deadline)
        print(f"tests: {suite_summary((out / 'tests.log').read_text(errors='replace'))}, {what}", flush=True)
    for name, (_, bench_args) in BENCHMARKS.items():
        if name in only:
            (out / f"{name}.json").unlink(missing_ok=True)
            what = timed_run([*bench_args, "--json", str(out / f"{name}.json")], out / f"{name}.log", 1200, deadline)
            print(f"{name}: {what}", flush=True)
    print(write_table(out, device))
    return 0


def write_table(out: Path, device: str) -> str:
    """OUT_DIR/report.md from the suite's log and the benchmarks' JSON found in `out`; returns the table."""
    tests_log = out / "tests.log"
    suite = suite_summary(tests_log.read_text(errors="replace")) if tests_log.exists() else "not run"
    results = {name: json.loads((out / f"{name}.json").read_text()) if (out / f"{name}.json").exists() else None
               for name in BENCHMARKS}
    report = table(results, suite, device)
    (out / "report.md").write_text(report + "\n")
    return report


if __name__ == "__main__":
    sys.exit(main())
