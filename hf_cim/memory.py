"""Memory and speed of a training run: the process's current and peak memory, step time and throughput.

Plain logic that works outside ``Trainer``: :class:`MemoryTracker` reads the memory (CUDA allocator or the process's
RSS), :class:`StepMeter` times optimizer steps and turns them into per-window and whole-run figures, reduced over
the ranks of a distributed run. :class:`hf_cim.callbacks.PeakMemoryCallback` is the thin ``TrainerCallback`` over
them.
"""

from __future__ import annotations

import logging
import math
import resource
import sys
import time
from typing import Any

import torch

from .distributed import all_gather_floats, world
from .rng import process_rank

__all__ = ["MemoryTracker", "StepMeter"]

logger = logging.getLogger(__name__)

_MB = 1024.0 * 1024.0


def _proc_status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        return None
    return None


class MemoryTracker:
    """Current and peak memory of this process, in MiB.

    Args:
        device: ``"cuda"`` (or a CUDA ``torch.device``): tensors allocated by PyTorch's caching allocator on the
            current CUDA device (``torch.cuda.memory_allocated`` / ``max_memory_allocated``). Anything else: the
            process's resident set size (RSS). On Linux the peak RSS is the kernel's high-water mark ``VmHWM``,
            reset by writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0); where that is not possible, the
            lifetime peak ``getrusage(RUSAGE_SELF).ru_maxrss``, which cannot be reset (``resettable`` is then False).
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        device = torch.device(device)
        self.kind = "cuda" if device.type == "cuda" else "cpu"
        self.device = device
        self.resettable = True

    def current_mb(self) -> float:
        if self.kind == "cuda":
            return torch.cuda.memory_allocated(self.device) / _MB
        rss = _proc_status_mb("VmRSS")
        if rss is not None:
            return rss
        import psutil  # not Linux: fall back to psutil (a transformers dependency chain, usually installed)

        return psutil.Process().memory_info().rss / _MB

    def peak_mb(self) -> float:
        """Peak since the last :meth:`reset_peak` (or process start)."""
        if self.kind == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / _MB
        hwm = _proc_status_mb("VmHWM")
        if hwm is not None and self.resettable:
            return hwm
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss / _MB if sys.platform == "darwin" else maxrss / 1024.0  # bytes on macOS, kB on Linux

    def reset_peak(self) -> bool:
        """Start a new peak window; returns whether the peak could be reset."""
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return True
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            if self.resettable:
                logger.info("MemoryTracker: cannot reset the peak RSS here; reporting the lifetime peak")
            self.resettable = False
        return self.resettable


class StepMeter:
    """Peak memory, step time and throughput of a training run, per logging window and over the whole run.

    Built when training begins (it resets the peak and reads the memory in use then); :meth:`step_begin` /
    :meth:`step_end` bracket each optimizer step; :meth:`window` returns the figures of the steps since the last
    call and starts a new window; :meth:`summary` those of the whole run. With several processes each rank measures
    itself and the figures are those of the worst rank (largest peak, slowest step time); every rank must then call
    :meth:`window` and :meth:`summary` at the same points (they gather over ranks).

    Args:
        device: the training device (see :class:`MemoryTracker`).
        tokens_per_sample: tokens in one sample, for ``tokens_per_second`` (else from ``tokens_seen``).
        tokens_seen: input tokens seen so far (``TrainerState.num_input_tokens_seen``), the start of the count.
    """

    def __init__(
        self, device: str | torch.device = "cpu", tokens_per_sample: int | None = None, tokens_seen: int = 0
    ) -> None:
        self.tokens_per_sample = tokens_per_sample
        self.tracker = MemoryTracker(device)
        self.tracker.reset_peak()
        self.start_mb = self.tracker.current_mb()
        self._reset_window(tokens_seen)
        self._tokens_seen_start = tokens_seen
        self._t_steps = 0
        self._t_time = 0.0
        self._t_samples = 0
        self._t_peak = self.tracker.peak_mb()
        self._t_step_start: float | None = None

    @property
    def own_peak_mb(self) -> float:
        """This rank's peak over the run so far, as last read (by :meth:`window` or :meth:`summary`), MiB."""
        return self._t_peak

    # The window holds the steps since the last log; the totals hold the whole run (this rank).
    def _reset_window(self, tokens_seen: int) -> None:
        self._w_steps = 0
        self._w_time = 0.0
        self._w_samples = 0
        self._w_tokens_seen = tokens_seen

    def _synchronize(self) -> None:
        if self.tracker.kind == "cuda":
            torch.cuda.synchronize(self.tracker.device)

    def step_begin(self) -> None:
        """An optimizer step starts (queued CUDA work is waited for first, so it is not timed)."""
        self._synchronize()
        self._t_step_start = time.perf_counter()

    def step_end(self, samples: int) -> None:
        """The step begun by :meth:`step_begin` ended, after ``samples`` samples on this rank; no-op without one."""
        if self._t_step_start is None:
            return
        self._synchronize()
        dt = time.perf_counter() - self._t_step_start
        self._t_step_start = None
        self._w_steps += 1
        self._w_time += dt
        self._w_samples += samples
        self._t_steps += 1
        self._t_time += dt
        self._t_samples += samples

    def _reduce(self, peak: float, time_s: float, steps: int, samples: int) -> dict[str, Any]:
        """Gather this rank's numbers with every other rank's; report the worst rank (largest peak, slowest step)."""
        rows = all_gather_floats([float(process_rank()), peak, time_s, float(steps), float(samples), self.start_mb])
        worst = max(rows, key=lambda r: r[1])
        slowest = max(r[2] for r in rows)
        total_samples = sum(r[4] for r in rows)
        return {
            "peak_memory_mb": worst[1],
            "peak_memory_growth_mb": worst[1] - worst[5],  # against that rank's own memory at the start
            "step_time_s": max(r[2] / r[3] for r in rows if r[3] > 0) if any(r[3] > 0 for r in rows) else math.nan,
            "samples_per_second": total_samples / slowest if slowest > 0 else math.nan,
            "slowest_time_s": slowest,
            "ranks": rows,
        }

    def _tokens_per_second(self, samples_per_second: float, tokens_seen_delta: float, slowest_time: float):
        if self.tokens_per_sample is not None:
            return samples_per_second * self.tokens_per_sample
        if tokens_seen_delta > 0 and slowest_time > 0:
            return tokens_seen_delta / slowest_time
        return None

    def window(self, tokens_seen: int = 0) -> dict[str, float]:
        """``peak_memory_mb``, ``peak_memory_growth_mb``, ``step_time_s``, ``samples_per_second`` (and
        ``tokens_per_second`` when known) of the steps since the last call, rounded to 6 decimals; then a new
        window (and peak) starts. Empty when no step ended in the window."""
        if self._w_steps == 0:
            return {}
        peak = self.tracker.peak_mb()
        self._t_peak = max(self._t_peak, peak)
        red = self._reduce(peak, self._w_time, self._w_steps, self._w_samples)
        slowest = red["slowest_time_s"]
        tokens_delta = tokens_seen - self._w_tokens_seen
        values = {k: red[k] for k in ("peak_memory_mb", "peak_memory_growth_mb", "step_time_s", "samples_per_second")}
        tps = self._tokens_per_second(red["samples_per_second"], tokens_delta, slowest)
        if tps is not None:
            values["tokens_per_second"] = tps
        self.tracker.reset_peak()
        self._reset_window(tokens_seen)
        return {k: round(v, 6) for k, v in values.items()}

    def summary(self, tokens_seen: int = 0) -> dict[str, Any]:
        """The whole run: overall peak and its growth, memory at the start, mean step time, throughput, device,
        world size and the per-rank numbers (what :class:`~hf_cim.callbacks.PeakMemoryCallback` writes)."""
        self._t_peak = max(self._t_peak, self.tracker.peak_mb())
        red = self._reduce(self._t_peak, self._t_time, self._t_steps, self._t_samples)
        slowest = red["slowest_time_s"]
        tokens_delta = tokens_seen - self._tokens_seen_start
        _, size = world()
        return {
            "peak_memory_mb": red["peak_memory_mb"],
            "peak_memory_growth_mb": red["peak_memory_growth_mb"],
            "start_memory_mb": max(r[5] for r in red["ranks"]),
            "mean_step_time_s": red["step_time_s"] if self._t_steps else None,
            "samples_per_second": red["samples_per_second"] if self._t_steps else None,
            "tokens_per_second": self._tokens_per_second(red["samples_per_second"], tokens_delta, slowest),
            "steps": self._t_steps,
            "device": str(self.tracker.device),
            "memory_kind": "cuda_max_memory_allocated" if self.tracker.kind == "cuda" else "cpu_peak_rss",
            "peak_resettable": self.tracker.resettable,
            "world_size": size,
            "ranks": [
                {
                    "rank": int(r[0]),
                    "peak_memory_mb": r[1],
                    "start_memory_mb": r[5],
                    "mean_step_time_s": r[2] / r[3] if r[3] else None,
                    "steps": int(r[3]),
                }
                for r in red["ranks"]
            ],
        }
