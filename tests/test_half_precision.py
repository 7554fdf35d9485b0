"""Half precision on a patched model: bf16 through the Trainer, fp16 autocast with loss scaling (CPU)."""

import datasets
import pytest
import torch
from helpers import tiny_gpt2, tiny_training_args
from transformers import Trainer

import hf_cim

IDS = torch.randint(0, 97, (16, 16), generator=torch.Generator().manual_seed(0))


def _trainer_losses(tmp_path, **kw):
    model = hf_cim.patch_model(tiny_gpt2(), hf_cim.get_preset("pcm", seed=0))
    ds = datasets.Dataset.from_dict({"input_ids": IDS.tolist(), "labels": IDS.tolist()})
    args = tiny_training_args(tmp_path, max_steps=3, logging_strategy="steps", logging_steps=1, **kw)
    trainer = Trainer(model=model, args=args, train_dataset=ds)
    trainer.train()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay float32
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_bf16_trainer_on_a_patched_model(tmp_path):
    fp32 = _trainer_losses(tmp_path / "fp32")
    bf16 = _trainer_losses(tmp_path / "bf16", bf16=True)
    assert len(bf16) == 3 and all(torch.isfinite(torch.tensor(bf16)))
    assert bf16 != fp32  # autocast really ran in bf16 ...
    assert bf16 == pytest.approx(fp32, abs=0.02)  # ... and trains the same model


@pytest.mark.parametrize("mode", ["ste", "full"])
def test_fp16_autocast_with_loss_scaling(mode):
    def run(half):
        model = hf_cim.patch_model(tiny_gpt2(), hf_cim.get_preset("rram", gradient=mode, seed=0))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=half)
        losses = []
        for _ in range(4):
            with torch.autocast("cpu", dtype=torch.float16, enabled=half):
                out = model(input_ids=IDS[:4], labels=IDS[:4])
                if half:
                    assert out.logits.dtype == torch.float16  # the analog layers follow autocast's dtype
            opt.zero_grad()
            scaler.scale(out.loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(out.loss.item())
        return losses

    fp32, fp16 = run(False), run(True)
    assert all(torch.isfinite(torch.tensor(fp16)))
    assert fp16 == pytest.approx(fp32, abs=0.03)
