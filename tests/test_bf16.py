"""bfloat16: which devices get it by default, and autocast must not change training beyond noise (on every device
here with bf16 instructions, whether or not `auto` picks bf16 on it; a CPU without them has no bf16 path to test)."""

from __future__ import annotations

import pytest
import torch

from selfrefine.data import TokenizedText, pad_batch
from selfrefine.model import Transformer
from selfrefine.recipes.sft import sft_step
from selfrefine import trainer
from selfrefine.trainer import TrainConfig, autocast_context, bf16_native, cpu_bf16_math, train
from tests.helpers import tiny_config

CPU = torch.device("cpu")
NATIVE = [d for d in ("cpu", "cuda")
          if (cpu_bf16_math() if d == "cpu" else torch.cuda.is_available() and bf16_native(torch.device(d)))]


def test_autocast_only_where_bf16_is_native_and_measured_faster(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(trainer, "cpu_bf16_speedup", lambda: 1.8)
    amp, scaler = autocast_context(CPU)
    assert isinstance(amp, torch.autocast) and amp.fast_dtype == torch.bfloat16 and not scaler
    assert not isinstance(autocast_context(CPU, "float32")[0], torch.autocast)
    monkeypatch.setattr(trainer, "cpu_bf16_speedup", lambda: 0.7)  # the instructions, but slower than float32
    assert not bf16_native(CPU) and not isinstance(autocast_context(CPU)[0], torch.autocast)
    monkeypatch.setattr(trainer, "cpu_bf16_speedup", lambda: 1.8)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    assert not bf16_native(CPU) and not isinstance(autocast_context(CPU)[0], torch.autocast)


def test_cpu_bf16_speedup_is_measured_once(monkeypatch):
    said = []
    monkeypatch.setattr(trainer.logger, "info", said.append)
    trainer.cpu_bf16_speedup.cache_clear()
    first = trainer.cpu_bf16_speedup()
    assert trainer.cpu_bf16_speedup() == first > 0
    assert len(said) == 1 and f"{first:.2f}x float32" in said[0]


def run(tmp_path, device: str, autocast: bool) -> list[float]:
    """The losses of 20 SFT steps, under bf16 autocast (where the device has bf16 instructions, however fast) or not."""
    torch.manual_seed(0)
    cfg = tiny_config(hidden_size=256, intermediate_size=512, num_layers=4, num_heads=8, num_kv_heads=4)
    model = Transformer(cfg).to(device)
    g = torch.Generator().manual_seed(1)
    data = [TokenizedText(ids := torch.randint(3, cfg.vocab_size, (64,), generator=g).tolist(), [-100] * 16 + ids[16:])
            for _ in range(32)]
    losses: list[float] = []

    def step(m, batch):
        loss, metrics, n = sft_step(m, batch)
        losses.append(loss.item())
        return loss, metrics, n

    cfg_train = TrainConfig(lr=1e-3, max_steps=20, batch_size=8, warmup=2, precision="auto" if autocast else "float32")
    train(model, data, lambda b: pad_batch(b, 2), step, cfg_train, tmp_path / cfg_train.precision, torch.device(device))
    return losses


@pytest.mark.skipif(not NATIVE, reason="no device here has bf16 math natively")
@pytest.mark.parametrize("device", NATIVE)
def test_bf16_sft_loss_within_2_percent_of_fp32(tmp_path, device, monkeypatch):
    monkeypatch.setattr(trainer, "cpu_bf16_speedup", lambda: float("inf"))  # bf16 even where float32 is faster
    bf16, fp32 = run(tmp_path, device, True), run(tmp_path, device, False)
    assert abs(bf16[-1] - fp32[-1]) / fp32[-1] < 0.02
    assert fp32[-1] < fp32[0]
