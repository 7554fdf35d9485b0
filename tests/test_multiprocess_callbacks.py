"""Two real gloo ranks on CPU (``torchrun --nproc_per_node 2``) running a tiny Trainer with every hf_cim callback."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("_mp_trainer_script.py")
BALLAST_MIB = 192  # rank 1 holds this much more memory than rank 0 (see the script)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(SCRIPT), str(out),
    ]  # fmt: skip
    try:  # seconds normally; a hung rank dumps its stacks and exits after 120 s (faulthandler in the script)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as err:
        tail = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else (err.stderr or "")
        pytest.fail(f"the 2-rank run did not end within 300 s; the end of its stderr:\n{tail[-6000:]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return out, ranks


def test_both_ranks_ran_distributed(run):
    _, ranks = run
    assert [r["rank"] for r in ranks] == [0, 1] and [r["dist_rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == r["dist_world_size"] == 2 for r in ranks)


def test_rank0_reports_the_max_over_ranks(run):
    out, ranks = run
    summary = json.loads((out / "hf_cim_memory.json").read_text())
    own = [r["own_peak_mb"] for r in ranks]
    assert own[1] >= own[0] + BALLAST_MIB * 0.75  # the ballast is really on rank 1
    assert summary["world_size"] == 2 and [r["rank"] for r in summary["ranks"]] == [0, 1]
    assert [r["peak_memory_mb"] for r in summary["ranks"]] == own
    assert summary["peak_memory_mb"] == max(own)
    assert summary["peak_memory_growth_mb"] == pytest.approx(max(own) - summary["ranks"][1]["start_memory_mb"])
    # Every log record holds the same (max, mean) values on both ranks, and the window peak is rank 1's.
    assert ranks[0]["logged"] == ranks[1]["logged"] and [r["step"] for r in ranks[0]["logged"]] == [2, 4]
    assert ranks[0]["logged"][0]["peak_memory_mb"] >= own[0] + BALLAST_MIB * 0.75
    assert all(0.9 < r["grad_cosine"] <= 1.0 for r in ranks[0]["logged"])
    assert [r["noise_level"] for r in ranks[0]["logged"]] == [0.5, 1.0]  # ramp over 1 step of 4: levels 0, 1, 1, 1


def test_robustness_sweep_uses_the_same_chip_on_every_rank(run):
    out, ranks = run
    assert ranks[0]["chip_sum"] == ranks[1]["chip_sum"]
    assert ranks[0]["robustness_values"] == ranks[1]["robustness_values"]
    result = json.loads((out / "robustness" / "robustness.json").read_text())
    assert len(result["rows"]) == 1 and result["rows"][0]["values"] == ranks[0]["robustness_values"]
