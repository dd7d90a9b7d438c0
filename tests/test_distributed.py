"""torchrun on CPU (gloo, 2 processes): DDP (SFT, DPO) and FSDP training equal one process with the global batch,
an interrupted DDP run resumes exactly, and sharded sampling/evaluation write what one process writes.

Run as a script (`python -m torch.distributed.run ... tests/test_distributed.py MODE ...`) this file is
the worker for the cases the recipes' own entry points cannot express (a SIGINT on one rank mid-run).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
# float32: one process and two ranks must agree to 1e-5, tighter than bf16 rounding of differently split batches
TRAIN = ["--batch-size", "2", "--grad-accum", "2", "--max-steps", "3", "--warmup", "0", "--seed", "3",
         "--precision", "float32"]


def torchrun(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *argv]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from tests.helpers import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("dist") / "model")


@pytest.fixture(scope="module")
def demos(model_dir: Path) -> Path:
    """9 examples of unequal completion lengths: the global micro-batches hold 4, 4 and 1 examples, so the
    ranks' token counts differ and in the last one rank has no example at all."""
    path = model_dir.parent / "demos.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i % 4 + 3}?",
                                        "completion": "Let's think step by step. " * (i % 3) + f"The answer is {i}."})
                            + "\n" for i in range(9)))
    return path


def sft_args(model_dir: Path, demos: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model_dir), "--data", str(demos), "--out", str(out), *TRAIN, *extra]


def single(model_dir: Path, demos: Path, out: Path, *extra: str) -> None:
    """One process with the global batch: batch 2 per rank x 2 ranks = 4."""
    from selfrefine.recipes import sft

    args = sft_args(model_dir, demos, out, *extra)
    args[args.index("--batch-size") + 1] = "4"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank: the same reduction order inside the kernels
    try:
        sft.main(args)
    finally:
        torch.set_num_threads(threads)


def test_ddp_lora_matches_one_process_and_resumes_exactly(model_dir: Path, demos: Path, tmp_path: Path):
    lora = ("--lora-dropout", "0", "--lr", "5e-4")
    single(model_dir, demos, tmp_path / "one", *lora)
    torchrun("train_sft.py", *sft_args(model_dir, demos, tmp_path / "ddp", *lora))
    one, ddp = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("one", "ddp"))
    assert max_diff(one, ddp) <= 1e-5 and max(t.abs().max() for k, t in one.items() if "lora_B" in k) > 5e-4
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "ddp")  # rank 0 alone logs, the global values
    assert len(m2) == 3 and [r["tokens"] for r in m1] == [r["tokens"] for r in m2]
    for a, b in zip(m1, m2):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5

    # SIGINT reaches rank 1 alone during step 2: both ranks stop after it, checkpoint, and a resume finishes
    # with the weights of the uninterrupted run.
    stopped = torchrun(__file__, "sft-stop-at", "3", *sft_args(model_dir, demos, tmp_path / "cut", *lora),
                       check=False)
    assert stopped.returncode != 0 and "interrupted after step 2" in stopped.stderr
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 2
    torchrun("train_sft.py", *sft_args(model_dir, demos, tmp_path / "cut", *lora, "--resume"))
    cut = load_file(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    assert max_diff(ddp, cut) <= 1e-6 and [r["step"] for r in metrics(tmp_path / "cut")] == [1, 2, 3]

    from selfrefine.errors import UserError
    from selfrefine.recipes import sft

    with pytest.raises(UserError, match="written by 2 process"):  # one process cannot replay a 2-rank run
        sft.main(sft_args(model_dir, demos, tmp_path / "ddp", *lora, "--resume", "--max-steps", "4",
                          "--allow-config-change"))


def test_fsdp_full_finetuning_matches_one_process(model_dir: Path, demos: Path, tmp_path: Path):
    full = ("--full", "--lr", "1e-3")
    single(model_dir, demos, tmp_path / "one", *full)
    torchrun("train_sft.py", *sft_args(model_dir, demos, tmp_path / "fsdp", *full, "--fsdp"))
    one, fsdp = (load_file(tmp_path / d / "merged" / "model.safetensors") for d in ("one", "fsdp"))
    start = load_file(model_dir / "model.safetensors")
    assert max_diff(one, fsdp) <= 1e-5 and max_diff(one, start) > 1e-4
    ckpt = torch.load(tmp_path / "fsdp" / "checkpoint.pt", weights_only=True)
    assert ckpt["world"] == 2 and len(ckpt["rng_ranks"]) == 2
    assert max_diff(ckpt["trainable"], torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)["trainable"]) <= 1e-5


def test_ddp_dpo_with_adapter_off_reference_matches_one_process(model_dir: Path, tmp_path: Path):
    """The reference pass (adapter switched off, no grad) goes through the DDP wrapper too; the loss is a
    per-pair mean, so ranks weigh by their pairs (7 pairs: global micro-batches of 4 and 3)."""
    from selfrefine.recipes import dpo

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"What is {i} times 2?", "rejected": f"The answer is {i + 7}.",
                                         "chosen": f"{i} * 2 = {2 * i}. " * (1 + i % 2) + f"The answer is {2 * i}."})
                             + "\n" for i in range(7)))
    args = ["--model", str(model_dir), "--pairs", str(pairs), *TRAIN, "--lr", "1e-3"]
    dpo.main([*args, "--out", str(tmp_path / "one"), "--batch-size", "4"])
    torchrun("train_dpo.py", *args, "--out", str(tmp_path / "ddp"))
    one, ddp = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("one", "ddp"))
    assert max_diff(one, ddp) <= 1e-5 and max(t.abs().max() for k, t in one.items() if "lora_B" in k) > 5e-4
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "ddp"), strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 and abs(a["rewards/margin"] - b["rewards/margin"]) <= 1e-6


def test_ddp_step_is_one_token_mean_over_ranks_and_micro_batches(tmp_path: Path):
    """2 processes x batch 2 and 2 processes x batch 1 x accum 2 give the update of one process with batch 4
    (float64, answers of 2 to 65 tokens, LoRA and full): the step's loss is weighted by the completion tokens of
    the whole step on every rank, not by each rank's or micro-batch's own mean."""
    from tests.test_trainer import one_step_update, update_diff

    torchrun(__file__, "accum", str(tmp_path / "ddp.pt"))
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    for full in (False, True):
        ref, ref_last = one_step_update(full, 4, 1, tmp_path / f"one-{full}")
        for bs, acc in ((2, 1), (1, 2)):
            upd, last = ddp[f"{full}-{bs}x{acc}"]
            assert update_diff(ref, upd) <= 1e-10, (full, bs, acc)
            assert abs(last["loss"] - ref_last["loss"]) <= 1e-12 * ref_last["loss"]
            assert abs(last["grad_norm"] - ref_last["grad_norm"]) <= 1e-10 * ref_last["grad_norm"]
            assert last["tokens"] == ref_last["tokens"]


SAMPLE = ["--task", "arith", "--size", "5", "--prompt", "both", "--n", "2", "--temperature", "1.0",
          "--batch-size", "2", "--max-new-tokens", "6", "--seed", "7", "--no-progress"]
EVAL = ["--task", "arith", "--task", "arith_ood", "--size", "5", "--batch-size", "2", "--max-new-tokens", "6",
        "--no-progress"]


def test_sharded_sample_and_eval_equal_one_process(model_dir: Path, tmp_path: Path):
    from selfrefine.recipes import eval as eval_recipe, sample

    sample.main(["--model", str(model_dir), *SAMPLE, "--out", str(tmp_path / "one.jsonl")])
    eval_recipe.main(["--model", str(model_dir), *EVAL, "--out", str(tmp_path / "one.json")])
    torchrun(__file__, "sample-eval", str(model_dir), str(tmp_path / "two.jsonl"), str(tmp_path / "two.json"))
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    assert len((tmp_path / "one.jsonl").read_text().splitlines()) == 5 * 2 + 5
    assert not list(tmp_path.glob("*.partial*"))
    for task in ("arith", "arith_ood"):
        assert ((tmp_path / f"two.{task}.predictions.jsonl").read_text()
                == (tmp_path / f"one.{task}.predictions.jsonl").read_text())
    one, two = (json.loads((tmp_path / f).read_text())["results"] for f in ("one.json", "two.json"))
    assert [{k: v for k, v in r.items() if k != "predictions"} for r in one] == \
           [{k: v for k, v in r.items() if k != "predictions"} for r in two]


def test_sample_resume_merges_every_ranks_partial_file(model_dir: Path, tmp_path: Path, monkeypatch):
    """Partial files left by an interrupted 2-rank run (OUT.partial, OUT.partial.1) finish in one process
    without sampling their rows again."""
    from selfrefine import answers
    from selfrefine.config import parse
    from selfrefine.recipes import sample

    argv = ["--model", str(model_dir), *SAMPLE, "--out", str(tmp_path / "s.jsonl")]
    full = sample.main(argv)
    header = {"_header": sample.partial_header(parse(sample.SampleConfig, argv, "sample.py"))}
    n_q = 5
    rows = [{**r, "_q": i // 2 if r["prompt_type"] == "cot" else i - 2 * n_q} for i, r in enumerate(full)]
    for name, part in (("s.jsonl.partial", rows[0::2]), ("s.jsonl.partial.1", rows[1::2][:-1])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in [header, *part]))
    sampled: list[int] = []
    real_generate = answers.generate
    monkeypatch.setattr(answers, "generate", lambda *a, batches, **kw: (sampled.extend(batches),
                                                                       real_generate(*a, batches=batches, **kw))[1])
    (tmp_path / "s.jsonl").unlink()
    assert sample.main([*argv, "--resume"]) == full
    assert len(sampled) == 1  # only the batch of the one missing row
    assert not list(tmp_path.glob("*.partial*"))


def _worker(mode: str, argv: list[str]) -> None:
    from selfrefine import distributed
    from selfrefine.errors import cli_main
    from selfrefine.recipes import eval as eval_recipe, sample, sft

    if mode == "sft-stop-at":  # SIGINT to rank 1 alone at its N-th micro-batch
        stop_at, calls, step = int(argv[0]), [0], sft.sft_step

        def stepping(model, batch):
            calls[0] += 1
            if calls[0] == stop_at and distributed.rank() == 1:
                os.kill(os.getpid(), signal.SIGINT)
            return step(model, batch)

        sft.sft_step = stepping
        cli_main(lambda: sft.main(argv[1:]))
    elif mode == "accum":  # one optimizer step of tests.test_trainer's float64 problem, on 2 ranks
        from tests.test_trainer import one_step_update

        distributed.init(torch.device("cpu"))
        out = Path(argv[0])
        results = {}
        for full in (False, True):
            for bs, acc in ((2, 1), (1, 2)):
                upd, last = one_step_update(full, bs, acc, out.parent / f"ddp-{full}-{bs}x{acc}")
                results[f"{full}-{bs}x{acc}"] = (upd, {k: last[k] for k in ("loss", "grad_norm", "tokens")})
        if distributed.is_main():
            torch.save(results, out)
        distributed.barrier()
    elif mode == "sample-eval":
        model, samples_out, eval_out = argv
        cli_main(lambda: sample.main(["--model", model, *SAMPLE, "--out", samples_out]))
        cli_main(lambda: eval_recipe.main(["--model", model, *EVAL, "--out", eval_out]))


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2:])
