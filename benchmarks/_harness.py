"""Shared timing and memory helpers for the scripts in ``benchmarks/`` (not part of the library).

Method, chosen for shared and noisy machines:

* **Interleaved rounds**: every variant runs once per round, in an order rotated by one each round, so that slow
  drifts of the machine (other jobs, thermal state) hit all variants alike.
* **Paired ratios**: a variant's ratio to the baseline is formed *within* each round, then summarised; this cancels
  most of the between-round noise that unpaired medians keep.
* **Median and min–max** over rounds, never the mean.
* **Wall and CPU time**: ``time.perf_counter`` and ``time.process_time`` (all threads of this process) per step,
  with ``torch.set_num_threads`` fixed. On a shared CPU the CPU time is far steadier than the wall time, because
  time spent waiting for a core does not count.
* **Peak memory per variant in a separate process** on CPU (peak RSS, ``VmHWM``, reset right before the measured
  steps), so that memory freed by other variants cannot be reused unseen; ``torch.cuda.max_memory_allocated`` after
  a reset on CUDA; on CPU also the peak of the tensor memory a step allocates (:func:`tensor_peak_mb`, torch's CPU
  allocator as the profiler records it), the counterpart of CUDA's figure.

Only the standard library and torch are used, so that any benchmark script can import it.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "CHILD_MARKER",
    "Summary",
    "TimingResult",
    "current_rss_mb",
    "emit_child_result",
    "cpu_line",
    "machine_info",
    "markdown_table",
    "peak_rss_mb",
    "reset_peak_rss",
    "run_child",
    "run_interleaved",
    "set_threads",
    "summarize",
    "synchronize",
    "tensor_peak_mb",
]

#: Prefix of the one line of JSON a child process prints as its result (other output of the child is ignored).
CHILD_MARKER = "@@BENCH_RESULT@@ "


@dataclass
class Summary:
    """Median and range of a sample."""

    median: float
    min: float
    max: float
    n: int

    def fmt(self, scale: float = 1.0, digits: int = 1) -> tuple[str, str]:
        """``("median", "min–max")`` as strings, values multiplied by ``scale``."""
        return f"{self.median * scale:.{digits}f}", f"{self.min * scale:.{digits}f}–{self.max * scale:.{digits}f}"


def summarize(values: Sequence[float]) -> Summary:
    """Median, min and max of ``values`` (non-empty)."""
    if not values:
        raise ValueError("summarize: `values` must not be empty")
    return Summary(statistics.median(values), min(values), max(values), len(values))


def set_threads(threads: int) -> int:
    """Fix torch's intra-op threads to ``threads`` (>= 1) and inter-op threads to 1; returns ``threads``."""
    if threads < 1:
        raise ValueError(f"set_threads: `threads` must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work has started: keep the existing value
        pass
    return threads


def synchronize(device: str | torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def current_rss_mb() -> float:
    """This process's resident set size now, in MiB (Linux ``/proc/self/statm``; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def _status_mb(field_name: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 2**10  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident set size, in MiB.

    Linux: ``VmHWM`` of ``/proc/self/status`` (this address space only; resettable by :func:`reset_peak_rss`).
    Not ``ru_maxrss``: Linux carries the parent's high-water mark across ``fork`` + ``exec``, so a child started by a
    large parent would report the parent's peak. Elsewhere: ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0: ``5`` into ``/proc/self/clear_refs``).

    Returns whether the reset worked; if not, :func:`peak_rss_mb` keeps the peak since the process started.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def tensor_peak_mb(fn: Callable[[], object]) -> float:
    """The peak of the tensor memory ``fn()`` allocates on the CPU, above what was allocated when it started, in MiB.

    Counted at torch's CPU allocator (every tensor, autograd's saved ones and the native kernels' outputs included;
    not oneDNN's or OpenMP's scratch): each allocation and free is recorded by the profiler with the allocator's
    running total, and the peak of that total above its value at the start is taken. It is the CPU's counterpart of
    CUDA's ``max_memory_allocated() - memory_allocated()``: unlike the RSS it does not count freed memory that the C
    library keeps mapped, nor miss memory it reuses, so it compares variants by what they hold, as a GPU's allocator
    would.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append((event.start_time_ns, event.extra_fields))
    if not events:
        return 0.0
    events.sort(key=lambda e: e[0])
    # The allocator's running total outlives a profiler session (it still counts what earlier sessions allocated and
    # is held): the count before the first event is the start.
    start = events[0][1].total_allocated - events[0][1].alloc_size
    return max(0, max(f.total_allocated for _, f in events) - start) / 2**20


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_line(info: dict[str, object]) -> str:
    """The CPU of :func:`machine_info` as a table header names it: model, vector ISA, whether bfloat16 is native."""
    bf16 = "bfloat16 native" if info.get("cpu_bf16_native") else "bfloat16 emulated"
    return f"{info['cpu']} ({info.get('cpu_isa', '?')}, {bf16})"


def machine_info(device: str | torch.device = "cpu") -> dict[str, object]:
    """What the numbers were measured on: CPU model, cores, torch version, threads, GPU name and the command line."""
    from hf_cim.noise.base import fast_bfloat16_products

    info: dict[str, object] = {
        "cpu": _cpu_model(),
        # What the presets' second-order products run in ("auto": bfloat16 only where it is native) and how fast the
        # float32 products are: tables from machines that differ here are not comparable.
        "cpu_isa": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_native": fast_bfloat16_products(torch.device("cpu")),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
    }
    try:
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


@dataclass
class TimingResult:
    """Per-round wall and CPU seconds per step of each variant, and the paired ratios to the baseline."""

    variants: list[str]
    baseline: str | None
    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    wall_ratio: dict[str, list[float]] = field(default_factory=dict)
    cpu_ratio: dict[str, list[float]] = field(default_factory=dict)
    orders: list[list[str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "variants": self.variants,
            "baseline": self.baseline,
            "wall_s_per_step": self.wall,
            "cpu_s_per_step": self.cpu,
            "wall_ratio": self.wall_ratio,
            "cpu_ratio": self.cpu_ratio,
            "orders": self.orders,
        }


def run_interleaved(
    steps: dict[str, Callable[[], None]],
    rounds: int,
    steps_per_round: int,
    warmup: int = 1,
    baseline: str | None = None,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = None,
) -> TimingResult:
    """Time each callable of ``steps`` (one training step each) in interleaved, rotated rounds.

    Args:
        steps: variant name → a function that runs one step (it must not synchronize itself).
        rounds: number of rounds (>= 1); each round runs every variant once, the order rotated by one per round.
        steps_per_round: consecutive steps of one variant per round (>= 1); the time per step is their mean.
        warmup: untimed steps of each variant before the first round (allocator, caches, lazy init).
        baseline: variant the ratios are formed against, within each round (None: no ratios).
        device: synchronized around each timed block (CUDA).
        log: optional progress callback.

    Returns:
        A :class:`TimingResult` with one value per round for every variant.
    """
    names = list(steps)
    if baseline is not None and baseline not in steps:
        raise ValueError(f"run_interleaved: `baseline` {baseline!r} is not one of {names}")
    if rounds < 1 or steps_per_round < 1 or warmup < 0:
        raise ValueError(
            f"run_interleaved: need `rounds` >= 1, `steps_per_round` >= 1, `warmup` >= 0; "
            f"got {rounds}, {steps_per_round}, {warmup}"
        )
    result = TimingResult(variants=names, baseline=baseline)
    for name in names:
        for _ in range(warmup):
            steps[name]()
        synchronize(device)
        result.wall[name] = []
        result.cpu[name] = []
    for r in range(rounds):
        k = r % len(names)
        order = names[k:] + names[:k]
        result.orders.append(order)
        for name in order:
            fn = steps[name]
            gc.collect()
            synchronize(device)
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps_per_round):
                fn()
            synchronize(device)
            w1, c1 = time.perf_counter(), time.process_time()
            result.wall[name].append((w1 - w0) / steps_per_round)
            result.cpu[name].append((c1 - c0) / steps_per_round)
        if log is not None:
            log(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {result.wall[n][-1] * 1e3:.0f} ms" for n in names))
    if baseline is not None:
        for name in names:
            result.wall_ratio[name] = [w / b for w, b in zip(result.wall[name], result.wall[baseline])]
            result.cpu_ratio[name] = [c / b for c, b in zip(result.cpu[name], result.cpu[baseline])]
    return result


def emit_child_result(payload: dict[str, object]) -> None:
    """Print ``payload`` as the child process's result line (see :func:`run_child`)."""
    sys.stdout.write(CHILD_MARKER + json.dumps(payload) + "\n")
    sys.stdout.flush()


def run_child(args: Sequence[str], timeout: float | None = None, env: dict[str, str] | None = None) -> dict:
    """Run ``python args...`` in a fresh process and return the JSON it printed with :func:`emit_child_result`.

    Raises:
        RuntimeError: if the child fails or prints no result line (its stderr tail is in the message).
    """
    cmd = [sys.executable, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(CHILD_MARKER):
            return json.loads(line[len(CHILD_MARKER) :])
    raise RuntimeError(
        f"child {shlex.join(cmd)} exited with {proc.returncode} and no result line; stderr tail:\n{proc.stderr[-2000:]}"
    )


def write_json(path: str | None, data: object) -> None:
    """Write a benchmark's results to ``path`` (its ``--out``; nothing when None), values JSON cannot hold as str."""
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=1, default=str)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)
