"""``accelerate launch`` data parallel (DDP) on two real gloo ranks on CPU, against one process on the same data.

Two ways that really give two ranks on a machine without GPU (accelerate 1.15): the repository's
``recipes/configs/cpu_2proc.yaml`` and ``--multi_gpu --num_processes 2`` (both: torch.distributed.run underneath, gloo
on CPU). ``--cpu --num_processes 2`` is NOT one of them: accelerate routes every ``--cpu`` launch to its single-process
launcher (``launch_command`` → ``simple_launcher``; several CPU processes need ``--mpirun_hostfile``), so it runs one
process (results.json: world_size 1). Two ranks with a per-device batch of 4 see the global batches of one process
with a batch of 8, so the losses, clean metrics and chip metrics must agree (see ``test_recipes_multiprocess``).
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from test_recipes_multiprocess import RECIPES, _compare, run_shakespeare
from test_recipes_shakespeare import clm_args, write_text

pytest.importorskip("accelerate")
if torch.cuda.is_available():
    pytest.skip("these are the CPU (gloo) launches; with a GPU accelerate would use it", allow_module_level=True)

CPU_2PROC = os.path.join(RECIPES, "configs", "cpu_2proc.yaml")
COMMON = ["--max_steps", "3", "--level", "0", "--eval_levels", "1", "--eval_chips", "2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate(launch_args, script_args, out, tmp_path):
    """``accelerate launch`` (as ``python -m accelerate.commands.launch``, the same interpreter) of run_shakespeare.

    The run's own product, ``results.json`` with both ranks in it, is what is checked; it is written after the last
    collective, so a non-zero exit code after it would not change it (none was seen in 14 runs here)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, "--main_process_port", str(_free_port()),
           os.path.join(RECIPES, "run_shakespeare.py"), *script_args]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("ACCELERATE_USE_CPU", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    log = proc.stdout[-3000:] + proc.stderr[-6000:]
    assert (out / "results.json").exists(), log
    assert proc.returncode == 0, log
    return json.loads((out / "results.json").read_text()), proc


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("acc")
    path, _ = write_text(tmp / "input.txt", n_chars=8000)
    run_shakespeare.main(clm_args(path, tmp / "one", *COMMON))
    return tmp, path, json.loads((tmp / "one" / "results.json").read_text())


@pytest.mark.parametrize(
    "launch",
    [["--config_file", CPU_2PROC], ["--multi_gpu", "--num_processes", "2"]],
    ids=["cpu_2proc.yaml", "multi_gpu"],
)
def test_accelerate_two_ranks_match_one_process(data, launch):
    tmp, path, one = data
    out = tmp / ("two_" + launch[-1].replace("/", "_"))
    args = clm_args(path, out, *COMMON) + ["--per_device_train_batch_size", "4"]
    two, _ = _accelerate(launch, args, out, tmp)
    _compare(one, two)  # world_size 2 in results.json, both ranks' memory reported, same losses and chips
