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

TINY = ["--shape", "tiny", "--batch", "2", "--seq", "32", "--steps", "2", "--warmup", "0"]


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
