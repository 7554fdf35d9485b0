"""FSDP2 (``fully_shard`` on every block and the model) on two real gloo ranks on CPU, against one process.

``tests/_mp_fsdp2_script.py`` runs under ``torchrun --nproc_per_node 2``; this module imports its helpers to run the
same steps in one process. With noise level 0 (converters only, deterministic) two ranks on half batches, with FSDP2
averaging the gradients, take the single-process steps on the full batches: the losses must agree. The chip is
programmed from the gathered weights with a seed that does not involve the rank, so every rank and the single
process hold the same chip; read noise is drawn per rank, so rank 0 (same stream as one process) gives the same chip
outputs. The checkpoint gathered from the shards reloads through ``from_pretrained`` as an analog model with the
same clean and chip outputs. Noisy training (level 1, per-rank noise) must give finite, falling losses.
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_cim

try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401
except ImportError:
    pytest.skip(
        "needs torch.distributed with FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6)",
        allow_module_level=True,
    )

import _mp_fsdp2_script as script  # noqa: E402  (tests/ is on sys.path under pytest)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as each rank has (OMP_NUM_THREADS=1): the same summation order in the reference."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(Path(script.__file__)), str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout[-3000:] + proc.stderr[-6000:]
    # Assert on what the ranks wrote, which they do only after the last collective; the exit code is checked too.
    assert (out / "rank0.json").exists() and (out / "rank1.json").exists(), log
    assert proc.returncode == 0, log
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return out, ranks


@pytest.fixture(scope="module")
def reference():
    """The same steps in one process, each on the full batch as two accumulated halves (the two ranks' arithmetic)."""
    model = script.build_model(level=0.0)
    losses = script.train(model, script.batches(), micro=2)
    ev = script.chip_eval(model)
    return model, losses, ev


def test_two_sharded_ranks_ran(run):
    _, ranks = run
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert all(r["sharded"] for r in ranks)  # every parameter a DTensor shard
    assert ranks[0]["state_keys"] > 0 and ranks[1]["state_keys"] == 0  # the full state dict only on rank 0


def test_sharded_training_takes_the_single_process_steps(run, reference):
    _, ranks = run
    _, losses, ev = reference
    for r in ranks:
        assert r["losses"] == pytest.approx(losses, rel=1e-6)
        assert r["clean_loss"] == pytest.approx(ev["clean_loss"], rel=1e-6)


def test_sharded_training_matches_full_batch_steps(run):
    """One process on the full batch in one piece: the same steps up to float summation order, which AdamW's first
    steps (``lr·sign(g)`` for tiny gradients) amplify to ~1e-4 by step 3 (the two-halves reference above is exact)."""
    _, ranks = run
    losses = script.train(script.build_model(level=0.0), script.batches())
    assert ranks[0]["losses"][0] == pytest.approx(losses[0], rel=1e-6)
    assert ranks[0]["losses"] == pytest.approx(losses, rel=5e-4)


def test_same_chip_on_every_rank_and_in_one_process(run, reference):
    out, ranks = run
    _, _, ev = reference
    assert ranks[0]["programmed"] == ranks[1]["programmed"]  # gathered from the shards: the same array everywhere
    assert ranks[0]["programmed"].keys() == ev["programmed"].keys()
    for name, value in ev["programmed"].items():
        assert ranks[0]["programmed"][name] == pytest.approx(value, rel=1e-4, abs=1e-4)
    assert ranks[0]["chip_loss"] == pytest.approx(ev["chip_loss"], rel=1e-5)  # rank 0: the single process's stream
    assert ranks[1]["chip_loss"] == pytest.approx(ev["chip_loss"], abs=0.05)  # its own read noise, same chip
    assert ranks[1]["chip_loss"] != ranks[0]["chip_loss"]
    outputs = torch.load(out / "outputs.pt")
    torch.testing.assert_close(outputs["clean_logits"], ev["clean_logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outputs["chip_logits"], ev["chip_logits"], rtol=1e-4, atol=1e-4)


def test_gathered_checkpoint_reloads_analog(run, reference):
    out, _ = run
    model, _, _ = reference
    from transformers import GPT2LMHeadModel

    loaded = GPT2LMHeadModel.from_pretrained(out / "ckpt")
    assert hf_cim.patch.get_config(loaded) == hf_cim.get_preset("pcm", level=0.0, seed=0)
    assert [n for n, _ in hf_cim.patch.analog_layers(loaded)] == [n for n, _ in hf_cim.patch.analog_layers(model)]
    ref_state = model.state_dict()
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, ref_state[key], rtol=1e-4, atol=1e-5)
    outputs = torch.load(out / "outputs.pt")
    ev = script.chip_eval(loaded)
    torch.testing.assert_close(ev["clean_logits"], outputs["clean_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ev["chip_logits"], outputs["chip_logits"], rtol=1e-5, atol=1e-5)


def test_noisy_sharded_training_falls(run):
    _, ranks = run
    losses = ranks[0]["noisy_losses"]
    assert losses == ranks[1]["noisy_losses"]  # all-reduced: the global loss
    assert len(losses) == script.NOISY_STEPS and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5
