"""The benchmarks must compare equal work: on the same weights and batch, ours and transformers(+peft) must
report the same losses step after step, and the report must end with `ratio_vs_hf=X.XX`."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from bench import dpo, train  # noqa: E402
from bench.common import SHAPES, matmul_params, model_config, random_model, train_flops_per_token  # noqa: E402

# float32: the oracle comparisons (losses as transformers' to 1e-4) are tighter than bf16 rounding
TINY = ["--shape", "tiny", "--batch", "2", "--seq", "32", "--steps", "2", "--warmup", "0", "--precision", "float32"]


def last_line(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


@pytest.mark.parametrize("extra", [[], ["--full", "--gradient-checkpointing"]])
def test_train_bench_same_losses_as_hf(tmp_path, capsys, extra):
    ratio = train.main([*TINY, *extra, "--json", str(tmp_path / "r.json")])
    assert last_line(capsys) == f"ratio_vs_hf={ratio:.2f}"
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["max_loss_diff"] < 1e-4
    ours, hf = out["rows"]
    assert math.isclose(ours["first loss"], hf["first loss"], rel_tol=1e-5)
    assert ours["first loss"] > 5  # ~log(512) for random weights: a real loss, not a zero
    assert len(ours["times_ms"]) == 2 and ours["tokens/s"] > 0


@pytest.mark.parametrize("extra", [[], ["--full"]])
def test_dpo_bench_same_losses_as_hf(tmp_path, capsys, extra):
    ratio = dpo.main([*TINY, *extra, "--steps", "3", "--json", str(tmp_path / "r.json")])
    assert last_line(capsys) == f"ratio_vs_hf={ratio:.2f}"
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["max_loss_diff"] < 1e-4
    rows = out["rows"]
    assert [r["first loss"] for r in rows] == pytest.approx([math.log(2)] * 3)  # policy == reference at step 0
    # the policy moves away from the reference, so the agreement check is not vacuous
    assert rows[0]["losses"][-1] < math.log(2) - 1e-4
    assert "ratio_on_the_fly_vs_hf" in out


def test_flops_count_by_hand():
    cfg = model_config(argparse.Namespace(shape="tiny", seq=32, layers=None))
    t = SHAPES["tiny"]
    h, i, v, L = t["hidden_size"], t["intermediate_size"], t["vocab_size"], t["num_layers"]
    kv = h // t["num_heads"] * t["num_kv_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i  # q, o; k, v; gate, up, down
    n = matmul_params(random_model(cfg, torch.float32, torch.device("cpu"), seed=0))
    assert n == L * per_layer + v * h  # + the (tied) LM head, which is a matmul even when tied
    assert train_flops_per_token(cfg, n, 32) == 6 * n + 12 * L * h * 32


def test_gpu_report_says_one_line_without_cuda_and_builds_its_table(tmp_path, capsys):
    """Without CUDA: one line, exit 0. The table comes from the benchmarks' own JSON (tiny CPU runs here), and a
    benchmark that failed is a row saying so."""
    import subprocess
    from pathlib import Path

    from bench import gpu_report

    if not torch.cuda.is_available():
        r = subprocess.run(["bash", "bench/gpu_report.sh"], cwd=Path(__file__).parent.parent, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 1 and "no CUDA" in r.stdout, r.stdout
    with pytest.raises(SystemExit) as e:
        gpu_report.main([str(tmp_path), "--only", "tests,sft_2b"])
    assert e.value.code == 2 and "unknown part(s) sft_2b" in capsys.readouterr().err
    train.main([*TINY, "--json", str(tmp_path / "t.json")])
    dpo.main([*TINY, "--json", str(tmp_path / "d.json")])
    capsys.readouterr()
    sampling = {"ratio_vs_hf": 1.5, "rows": [
        {"batch": b, "impl": impl, "new tok/s": tok_s, "total s": 1.0, "decode ms/step": 2.0, "floor ms/step": 1.0,
         "same greedy rows %": 100.0}
        for b in (1, 64) for impl, tok_s in (("ours", 300.0 * b), ("transformers", 200.0 * b))]}
    workloads = {"workload_ratios": {"eval": 2.0}, "matmul_ceiling_gflops": 500.0, "workloads": [
        {"workload": "eval", "impl": impl, "batch": b, "s": s, "GFLOP/s": 100.0 / s}
        for impl, b, s in (("ours", 64, 1.0), ("transformers", 8, 3.0), ("transformers", 32, 2.0))]}
    results = {"sft_1b": json.loads((tmp_path / "t.json").read_text()),
               "dpo_1b": json.loads((tmp_path / "d.json").read_text()), "sampling": sampling,
               "sampling_eager": {**sampling, "rows": sampling["rows"][:2]}, "workloads": workloads, "lora_7b": None}
    text = gpu_report.table(results, "10 passed", "a test device")
    lines = text.splitlines()
    assert lines[0] == "GPU report: a test device; test suite on the GPU: 10 passed"
    assert f"| {results['sft_1b']['ratio_vs_hf']:.2f} |" in lines[4] and "MFU -" in lines[4]
    assert f"| {results['dpo_1b']['ratio_vs_hf']:.2f} |" in lines[5]
    assert "batch 1, CUDA graph | 300.0 tok/s | 200.0 tok/s | 1.50 |" in lines[6] and "batch 64, CUDA" in lines[7]
    assert "batch 1, eager step | 300.0 tok/s | 200.0 tok/s | 1.50 |" in lines[8]
    assert "eval workload (ours 64 slots; transformers best batch 32) | 1.0 s | 2.0 s | 2.00 |" in lines[9]
    assert "no result (see lora_7b.log)" in lines[10] and len(lines) == 11
    assert gpu_report.suite_summary("...\n===== 650 passed, 1 skipped in 91.2s =====\n") == "650 passed, 1 skipped"


def test_gpu_report_main_runs_its_parts_and_writes_the_table(tmp_path, monkeypatch, capsys):
    """The report's own flow, as on a GPU (CUDA faked; one tiny CPU benchmark stands in for the real ones): the part
    runs in its own process, its JSON becomes its row, the parts not run are 'no result' rows; `--table-only`
    rebuilds the same table from the folder without CUDA."""
    from bench import gpu_report

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a faked GPU")
    what, _ = gpu_report.BENCHMARKS["sft_1b"]
    monkeypatch.setitem(gpu_report.BENCHMARKS, "sft_1b", (what, ["bench/train.py", *TINY]))
    assert gpu_report.main([str(tmp_path), "--only", "sft_1b"]) == 0  # no --budget: as a user runs it
    result = json.loads((tmp_path / "sft_1b.json").read_text())
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert lines[0].startswith("GPU report: a faked GPU, torch ") and lines[0].endswith("test suite on the GPU: not run")
    assert f"| {result['ratio_vs_hf']:.2f} |" in lines[4] and "no result (see dpo_1b.log)" in lines[5]
    assert "sft_1b: ok (" in capsys.readouterr().out
    # The same table again from the folder alone, on a machine without CUDA (results gathered elsewhere)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "report.md").unlink()
    assert gpu_report.main([str(tmp_path), "--table-only"]) == 0
    assert (tmp_path / "report.md").read_text().splitlines() == lines
    with pytest.raises(SystemExit) as e:
        gpu_report.main([str(tmp_path / "nowhere"), "--table-only"])
    assert e.value.code == 2 and "is not a folder of results" in capsys.readouterr().err


def test_gpu_report_parts_keep_to_the_budget(tmp_path):
    """A part with too little of --budget left is not started and its log says why; without a budget (an infinite
    deadline) it runs; one that outruns its time is stopped."""
    import time

    from bench import gpu_report

    now = time.perf_counter()
    what = gpu_report.timed_run(["-c", "print('ran')"], tmp_path / "a.log", 60, now + gpu_report.MIN_PART_S - 1)
    assert what == "not run (out of --budget)" and (tmp_path / "a.log").read_text().startswith("not run")
    assert gpu_report.timed_run(["-c", "print('ran')"], tmp_path / "b.log", 60, float("inf")).startswith("ok")
    assert (tmp_path / "b.log").read_text() == "ran\n"
    what = gpu_report.timed_run(["-c", "import time; time.sleep(60)"], tmp_path / "c.log", 1,
                                time.perf_counter() + 600)
    assert what.startswith("timed out")


def test_real_eval_workload_does_the_same_greedy_work_as_transformers(smollm2_gguf):
    """bench/workloads.py on 3 questions: every side makes the same tokens per row (greedy), and the ratio is
    the best transformers time over ours."""
    from bench import workloads

    rows, ratios, ceiling = workloads.run(torch.device("cpu"), torch.float32, 4, 1, 3, ["eval"])
    assert [(r["impl"], r["batch"]) for r in rows] == [("ours", 4)] + [("transformers", b)
                                                                        for b in workloads.HF_BATCHES]
    assert [r["same greedy lengths %"] for r in rows] == [100.0] * (1 + len(workloads.HF_BATCHES))
    assert len({r["new tokens"] for r in rows}) == 1 and rows[0]["new tokens"] > 0
    assert ratios == {"eval": pytest.approx(min(r["s"] for r in rows[1:]) / rows[0]["s"])} and ceiling > 0


def test_ratio_bound_by_hand():
    """Ours did 40 GFLOP in 2 s; at a 100 GFLOP/s ceiling that work takes 0.4 s; the best peer took 3 s."""
    from bench.workloads import ratio_bound

    rows = [{"s": 2.0, "GFLOP/s": 20.0}, {"s": 5.0, "GFLOP/s": 8.0}, {"s": 3.0, "GFLOP/s": 13.0}]
    assert ratio_bound(rows, 100.0) == pytest.approx(3.0 / 0.4)
