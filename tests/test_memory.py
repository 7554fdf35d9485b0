"""hf_cim.memory: the memory tracker and the step meter, without a Trainer."""

import math
import time

import pytest
import torch
from helpers import fresh_resident_memory

from hf_cim.memory import MemoryTracker, StepMeter


def test_cpu_peak_is_at_least_start_and_grows_with_a_held_tensor():
    tracker = MemoryTracker("cpu")
    tracker.reset_peak()
    start = tracker.current_mb()
    peak0 = tracker.peak_mb()
    assert peak0 >= start - 0.5  # the kernel's high-water mark is never below the current RSS (kB rounding)
    # Enough to pass the old peak even where it cannot be reset (lifetime ru_maxrss).
    mib = max(0.0, peak0 - start) + 160
    held = fresh_resident_memory(mib)
    peak1 = tracker.peak_mb()
    assert peak1 >= peak0 + 128
    assert tracker.current_mb() >= start + 128
    del held
    if tracker.reset_peak():  # a new window starts from the current RSS, after the tensor is gone
        assert tracker.peak_mb() < peak1 - 100


def test_step_meter_windows_and_summary_in_a_plain_loop():
    meter = StepMeter("cpu", tokens_per_sample=16)
    assert meter.window() == {}  # no step ended yet: nothing to log
    for _ in range(3):
        meter.step_begin()
        time.sleep(0.01)
        meter.step_end(samples=8)
    meter.step_end(samples=8)  # without step_begin: ignored
    logs = meter.window(tokens_seen=0)
    assert set(logs) == {
        "peak_memory_mb",
        "peak_memory_growth_mb",
        "step_time_s",
        "samples_per_second",
        "tokens_per_second",
    }
    assert all(math.isfinite(v) for v in logs.values())
    assert logs["step_time_s"] >= 0.01
    assert logs["samples_per_second"] * logs["step_time_s"] == pytest.approx(8, rel=1e-3)
    assert logs["tokens_per_second"] == pytest.approx(logs["samples_per_second"] * 16, rel=1e-5)
    assert meter.window() == {}  # a new window starts after each call

    summary = meter.summary()
    assert summary["steps"] == 3 and summary["world_size"] == 1 and summary["device"] == "cpu"
    assert summary["memory_kind"] == "cpu_peak_rss" and [r["rank"] for r in summary["ranks"]] == [0]
    assert summary["samples_per_second"] * summary["mean_step_time_s"] == pytest.approx(8, rel=1e-6)
    assert summary["peak_memory_mb"] == pytest.approx(meter.own_peak_mb) and meter.own_peak_mb >= meter.start_mb - 0.5


def test_step_meter_counts_tokens_seen_without_tokens_per_sample():
    meter = StepMeter(torch.device("cpu"), tokens_seen=100)
    meter.step_begin()
    time.sleep(0.01)
    meter.step_end(samples=4)
    logs = meter.window(tokens_seen=164)
    assert logs["tokens_per_second"] == pytest.approx(64 / logs["step_time_s"], rel=1e-3)
    meter.step_begin()
    meter.step_end(samples=4)
    assert "tokens_per_second" not in meter.window(tokens_seen=164)  # no new token in this window
