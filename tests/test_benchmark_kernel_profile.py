"""benchmarks/kernel_profile.py and benchmarks/gpu_session.sh (the GPU session script's plumbing, dry-run on CPU)."""

import os
import subprocess
import sys
import tarfile

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import kernel_profile  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")


pytestmark = pytest.mark.usefixtures("transformers_verbosity_restored")


def test_profile_counts_the_analog_ops_on_top_of_plain(capsys):
    out = kernel_profile.main(["--device", "cpu", "--quick", "--variants", "plain,ste", "--steps", "1",
                               "--warmup", "1", "--top", "3", "--threads", "1"])  # fmt: skip
    plain, ste = out["plain"], out["ste"]
    assert ste["launches_per_step"] > plain["launches_per_step"]  # DAC, programming, epilogue on top of the products
    for res in (plain, ste):
        times = [r["ms_per_step"] for r in res["kernels"]]
        assert times == sorted(times, reverse=True) and times[0] > 0
        assert 0 < res["busy_ms"] and 0 < res["wall_ms"]
    printed = capsys.readouterr().out
    assert "## ste:" in printed and "| op | calls/step | self-CPU ms/step |" in printed


def test_profile_refuses_bad_arguments():
    with pytest.raises(SystemExit, match="--steps >= 1"):
        kernel_profile.main(["--device", "cpu", "--steps", "0"])
    with pytest.raises(SystemExit, match="unknown 'gpt5'"):
        kernel_profile.main(["--device", "cpu", "--model", "gpt5"])


def test_gpu_session_script_dry_run_writes_its_three_files(tmp_path):
    env = {**os.environ, "DEVICE": "cpu", "QUICK": "1", "STAGES": "profile"}
    run = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_session.sh"), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert sorted(os.listdir(tmp_path)) == ["json.tar.gz", "session.log", "tables.md"]
    tables = (tmp_path / "tables.md").read_text()
    assert "=== kernel_profile: rc 0" in tables and "# Kernel profile" in tables and "## ste:" in tables
    with tarfile.open(tmp_path / "json.tar.gz") as tar:
        assert tar.getnames() == ["json", "json/profile.json"]
