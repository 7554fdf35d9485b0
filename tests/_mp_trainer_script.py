"""A tiny Trainer run with every hf_cim callback and a robustness sweep, for ``torchrun --nproc_per_node 2`` on CPU.

Used by ``tests/test_multiprocess_callbacks.py``. Rank 1 holds an extra 192 MiB tensor during training, so the rank
with the largest peak is known. Each rank writes ``rank<r>.json`` with what it measured itself and what it logged.

Usage: ``torchrun --nproc_per_node 2 tests/_mp_trainer_script.py OUTPUT_DIR``
"""

import faulthandler
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The run takes seconds; once (in one CI run of many) it hung after its mid-training evaluation. Should a rank hang
# again, it prints every thread's stack and exits well before the test's limit, so the failure shows where.
faulthandler.dump_traceback_later(120, exit=True)

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import hf_cim  # noqa: E402
from hf_cim.callbacks import GradientAlignmentCallback, NoiseLevelCallback, PeakMemoryCallback  # noqa: E402
from hf_cim.evaluation import evaluate_robustness  # noqa: E402

SEQ, VOCAB, BALLAST_MIB = 16, 97, 192


class Ballast(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        if args.process_index == 1:
            self.tensor = torch.ones(BALLAST_MIB * 2**20 // 4)


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=SEQ, bos_token_id=0, eos_token_id=0)
    )
    hf_cim.patch_model(model, hf_cim.AnalogNoiseConfig(exclude_modules=["lm_head"]))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": (ids := torch.randint(0, VOCAB, (SEQ,), generator=g)), "labels": ids} for _ in range(64)]
    probe = {k: torch.stack([d[k] for d in data[:4]]) for k in ("input_ids", "labels")}
    memory = PeakMemoryCallback(tokens_per_sample=SEQ)
    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=4,
        logging_steps=2,
        report_to="none",
        use_cpu=True,  # without it transformers 5.24 under torchrun on CPU trains each rank alone (NOT_PARALLEL)
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    callbacks = [
        Ballast(),
        memory,
        GradientAlignmentCallback(probe, every_n_steps=2),
        NoiseLevelCallback(1.0, warmup_ratio=0.25),
    ]
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:16], callbacks=callbacks)
    trainer.train()

    # The same chip on every rank: each rank evaluates its shard of the data on the same devices.
    hf_cim.program_chip(model, 7)
    chip = dict(hf_cim.patch.analog_layers(model))["transformer.h.0.mlp.c_fc"].hf_cim_state.chip[0]
    chip_sum = float(chip.double().sum())
    hf_cim.clear_chip(model)
    result = evaluate_robustness(
        model, trainer, "eval_loss", seeds=2, levels=(1.0,), output_dir=os.path.join(out_dir, "robustness"), plot=False
    )

    rank = trainer.args.process_index
    record = {
        "rank": rank,
        "world_size": trainer.args.world_size,
        "dist_rank": torch.distributed.get_rank() if torch.distributed.is_initialized() else 0,
        "dist_world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        "own_peak_mb": memory.meter.own_peak_mb,
        "logged": [
            {k: r[k] for k in ("step", "peak_memory_mb", "grad_cosine", "noise_level")}
            for r in trainer.state.log_history
            if "loss" in r
        ],
        "chip_sum": chip_sum,
        "robustness_values": result.rows[0]["values"],
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # Everything is written and the process group is gone. A clean-clone CI run caught a rank hanging here, after
    # main returned (faulthandler: no frame below this line), in the destructors of the Trainer's and gloo's C++
    # objects at teardown; leave without running them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
