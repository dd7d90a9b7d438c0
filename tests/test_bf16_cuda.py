"""bfloat16 autocast must not change training beyond noise (CUDA only: the CPU path trains in float32)."""

from __future__ import annotations

import pytest
import torch

from selfrefine.data import TokenizedText, pad_batch
from selfrefine.model import Transformer
from selfrefine.recipes.sft import sft_step
from selfrefine.trainer import TrainConfig, train
from tests.helpers import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs CUDA: on the CPU training runs in float32, there is no bf16 path to test")


def run(tmp_path, autocast: bool) -> list[float]:
    torch.manual_seed(0)
    cfg = tiny_config(hidden_size=256, intermediate_size=512, num_layers=4, num_heads=8, num_kv_heads=4)
    model = Transformer(cfg).cuda()
    g = torch.Generator().manual_seed(1)
    data = [TokenizedText(ids := torch.randint(3, cfg.vocab_size, (64,), generator=g).tolist(), [-100] * 16 + ids[16:])
            for _ in range(32)]
    losses: list[float] = []

    def step(m, batch):
        loss, metrics, n = sft_step(m, batch)
        losses.append(loss.item())
        return loss, metrics, n

    cfg_train = TrainConfig(lr=1e-3, max_steps=20, batch_size=8, warmup=2, precision="auto" if autocast else "float32")
    train(model, data, lambda b: pad_batch(b, 2), step, cfg_train, tmp_path / cfg_train.precision, torch.device("cuda"))
    return losses


def test_bf16_sft_loss_within_2_percent_of_fp32(tmp_path):
    bf16, fp32 = run(tmp_path, True), run(tmp_path, False)
    assert abs(bf16[-1] - fp32[-1]) / fp32[-1] < 0.02
    assert fp32[-1] < fp32[0]
