"""FSDP2 (``torch.distributed.fsdp.fully_shard``) on a patched tiny GPT-2, for ``torchrun --nproc_per_node 2`` on CPU.

Used by ``tests/test_fsdp2.py``, which imports the same helpers to run the single-process reference. Each rank:

1. trains the ``pcm`` preset at noise level 0 (converters only: deterministic) with every block and the model
   sharded, each rank on its half of every global batch (FSDP2 averages the gradients, so the steps are the
   single-process steps on the full batch); records the global loss of each step;
2. programs a chip (``program_chip`` gathers the sharded weights), evaluates the same batch at level 1 with the noise
   streams restarted, and clean;
3. gathers a full state dict (``get_model_state_dict(..., full_state_dict=True, cpu_offload=True)``); rank 0 saves it
   with ``save_pretrained`` (the noise config travels in ``config.json``);
4. trains a fresh sharded model at noise level 1 (each rank its own noise stream) and records the losses.

Each rank writes ``rank<r>.json``; rank 0 also ``outputs.pt`` (its logits) and the checkpoint in ``ckpt/``.

Usage: ``torchrun --nproc_per_node 2 tests/_mp_fsdp2_script.py OUTPUT_DIR``
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import hf_cim  # noqa: E402

SEQ, VOCAB, BATCH, STEPS, LR = 16, 97, 8, 3, 1e-2
CHIP_SEED, STREAM_SEED, NOISY_STEPS = 7, 11, 8


def build_model(level: float) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=SEQ, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    hf_cim.patch_model(model, hf_cim.get_preset("pcm", level=level, seed=0))
    return model


def batches(n: int = STEPS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(n)]


def eval_batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def train(model, data, rank: int = 0, world: int = 1, micro: int = 1) -> list[float]:
    """AdamW steps, each rank on its contiguous share of every batch; returns the global (all-rank mean) losses.

    ``micro`` > 1 (one process): accumulate the mean of ``micro`` equal slices of each batch, the arithmetic of
    ``micro`` ranks whose gradients are averaged.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    model.train()
    losses = []
    share = BATCH // world
    for ids in data:
        local = ids[rank * share : (rank + 1) * share]
        loss = 0.0
        for part in local.chunk(micro):
            part_loss = model(input_ids=part, labels=part).loss / micro
            part_loss.backward()
            loss = loss + part_loss.detach()
        opt.step()
        opt.zero_grad()
        loss = loss.clone()
        if world > 1:
            torch.distributed.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    return losses


def chip_eval(model) -> dict:
    """Clean and chip (level 1, chip ``CHIP_SEED``, noise streams from ``STREAM_SEED``) logits on the eval batch."""
    ids = eval_batch()
    model.eval()
    with torch.no_grad(), hf_cim.noise_disabled(model):
        clean = model(input_ids=ids, labels=ids)
    hf_cim.set_noise_level(model, 1.0)
    hf_cim.program_chip(model, CHIP_SEED)
    hf_cim.reseed(model, STREAM_SEED)
    with torch.no_grad():
        chip = model(input_ids=ids, labels=ids)
    programmed = {
        name: float(layer.hf_cim_state.chip[0].double().sum()) for name, layer in hf_cim.patch.analog_layers(model)
    }
    return {
        "clean_logits": clean.logits,
        "clean_loss": clean.loss.item(),
        "chip_logits": chip.logits,
        "chip_loss": chip.loss.item(),
        "programmed": programmed,
    }


def shard(model) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)


def main(out_dir: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()

    # 1. exact part: level 0, sharded.
    model = build_model(level=0.0)
    shard(model)
    sharded = all(type(p).__name__ == "DTensor" for p in model.parameters())
    losses = train(model, batches(), rank, world)

    # 2. a chip programmed from the sharded weights.
    ev = chip_eval(model)

    # 3. a full state dict, saved by rank 0 as a Hub-style checkpoint.
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    state_keys = len(state)  # all keys on rank 0, none elsewhere (cpu_offload); save_pretrained empties the dict
    if rank == 0:
        model.save_pretrained(os.path.join(out_dir, "ckpt"), state_dict=state)
        torch.save({k: ev[k] for k in ("clean_logits", "chip_logits")}, os.path.join(out_dir, "outputs.pt"))
    torch.distributed.barrier()

    # 4. noisy training: level 1, each rank its own noise stream.
    noisy = build_model(level=1.0)
    shard(noisy)
    fixed = batches(1) * NOISY_STEPS  # one batch again and again: the loss must fall
    noisy_losses = train(noisy, fixed, rank, world)

    record = {
        "rank": rank,
        "world_size": world,
        "sharded": sharded,
        "state_keys": state_keys,
        "losses": losses,
        "clean_loss": ev["clean_loss"],
        "chip_loss": ev["chip_loss"],
        "programmed": ev["programmed"],
        "noisy_losses": noisy_losses,
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
