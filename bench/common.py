"""What every bench script shares: the machine's description, timing in interleaved rounds (medians, and ratios
paired within a round), peak memory, and tables printed and appended to ``bench/RESULTS.md``.

The machines these run on are shared and noisy, so a figure that compares is a ratio of two things measured in
the same run, round by round: in each round every variant runs once, one after the other, so that a slow spell
slows them all and the ratio of that round stays fair; the reported ratio is the median over rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import logging
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
RESULTS_HEADER = """# Benchmark results

Appended by the scripts in `bench/` (newest last); each entry names the command that wrote it and the machine.
Ratios are measured in the same run (paired round by round, median over rounds); absolute figures from different
entries are not comparable on a shared machine. See README.md, "Performance".
"""

# Dense peak TFLOP/s of common GPUs from NVIDIA's data sheets: (fp32, tf32, bf16/fp16 tensor cores).
# Matched by substring of torch.cuda.get_device_name(), first match wins (so "A100" before "A10").
GPU_PEAK_TFLOPS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("H200", (67.0, 494.7, 989.4)),
    ("H100 PCIe", (51.2, 378.0, 756.0)),
    ("H100", (67.0, 494.7, 989.4)),  # SXM5
    ("A100", (19.5, 156.0, 312.0)),
    ("A10", (31.2, 62.5, 125.0)),  # A10 and A10G
    ("L4", (30.3, 60.0, 121.0)),
)
# FP32 FLOP per cycle per core assumed for the CPU estimate: two 256-bit FMA pipes (AVX2; AMD Zen 4's AVX-512).
CPU_FP32_FLOP_PER_CYCLE = 32


# -- the machine ------------------------------------------------------------------------------------------


def _cpuinfo(key: str) -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() == key:
                return line.split(":", 1)[1].strip()
    return None


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:
        return "absent"


def machine() -> dict[str, str]:
    """The CPU model, cores, memory, GPU, library versions and the load average when asked."""
    mem_kb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})"
    else:
        gpu = "none (no CUDA)"
    mhz = _cpuinfo("cpu MHz")
    return {
        "cpu": f"{_cpuinfo('model name') or platform.processor() or platform.machine()}"
        + (f" @ {float(mhz) / 1000:.2f} GHz" if mhz else ""),
        "cores": f"{cpu_cores()} usable ({os.cpu_count()} online), torch threads {torch.get_num_threads()}",
        "memory": f"{mem_kb / 2**20:.0f} GiB" if mem_kb else "n/a",
        "gpu": gpu,
        "versions": (
            f"python {platform.python_version()}, torch {torch.__version__}, torchvision {_version('torchvision')}, "
            f"faiss {_version('faiss')}, onnxruntime {_version('onnxruntime')}"
        ),
        "os": platform.platform(),
        "load average (1, 5, 15 min) at start / end": f"{_LOAD_AT_START or 'n/a'} / {_load_average()}",
    }


def _load_average() -> str:
    """The run queue's length averaged over 1, 5 and 15 minutes: above the core count, the run shared them."""
    return ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


_LOAD_AT_START: str | None = None  # set by setup()


def cpu_peak_gflops() -> float | None:
    """Estimated FP32 peak of the cores torch's threads can use: min(threads, cores) x nominal clock x 32
    FLOP/cycle. An estimate: under a hypervisor /proc/cpuinfo gives the nominal clock, and cores that boost above
    it can pass this "peak"."""
    mhz = _cpuinfo("cpu MHz")
    if mhz is None:
        return None
    return min(torch.get_num_threads(), cpu_cores()) * float(mhz) / 1000 * CPU_FP32_FLOP_PER_CYCLE


def conv_uses_tf32() -> bool:
    """Whether cuDNN may run fp32 convolutions in TF32 (PyTorch's default for convolutions)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9
        return conv.fp32_precision == "tf32" or (
            conv.fp32_precision == "none" and torch.backends.cudnn.fp32_precision == "tf32"
        )
    return bool(torch.backends.cudnn.allow_tf32)


def gpu_peak_tflops(precision: str) -> float | None:
    """Dense peak of CUDA device 0 for ``precision`` (fp32 counts as TF32 when cuDNN may use it, PyTorch's
    default for convolutions); None for a GPU not in the table."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    for key, (fp32, tf32, half) in GPU_PEAK_TFLOPS:
        if key in name:
            if precision == "fp32":
                return tf32 if conv_uses_tf32() else fp32
            return half
    return None


# -- timing ----------------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear between the closest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def time_call(fn: Callable[[], Any]) -> float:
    """Seconds one call takes (the call itself synchronises where it runs asynchronously, e.g. CUDA)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_rounds(calls: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each entry of ``calls``, one call of each per round, in the same order each round."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name].append(time_call(fn))
    return times


def paired_ratio(reference: Sequence[float], other: Sequence[float]) -> float:
    """Median over rounds of reference time / other time: > 1 means ``other`` is faster."""
    return median([r / o for r, o in zip(reference, other, strict=True) if o > 0])


def rounds_within(budget_s: float, round_s: float, min_rounds: int, max_rounds: int) -> int:
    """As many rounds as fit in ``budget_s`` (a round lasting ``round_s``), between the two bounds."""
    if round_s <= 0:
        return max_rounds
    return max(min_rounds, min(max_rounds, int(budget_s / round_s)))


# -- memory ----------------------------------------------------------------------------------------------


def _release_free_heap() -> None:
    """glibc: hand the free pages of every heap back to the OS (malloc_trim), so that memory freed before a
    measured block and reused in it counts again when it is touched. No-op without glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_kb(key: str) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a block above what was held when it began, in bytes (``.bytes``; None when unknown).

    CUDA: the caching allocator's peak (``torch.cuda.max_memory_allocated``). CPU: the process's peak resident
    set (VmHWM, reset through ``/proc/self/clear_refs``), which counts every allocator, ONNX Runtime's included;
    tracemalloc would miss torch's tensors.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            _release_free_heap()
            self._exact = _reset_peak_rss()
            self._base = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self._base
        else:
            peak = _status_kb("VmHWM")
            if self._exact and self._base is not None and peak is not None:
                self.bytes = max(0, peak - self._base) * 1024


# -- tables and RESULTS.md -------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers to ``digits`` significant figures (no exponent below 1e6), None to n/a, the rest as str."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if value != value:  # NaN
        return "n/a"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 10 ** (digits - 1):
        return f"{value:.0f}"
    decimals = digits - 1 - int(f"{magnitude:e}".split("e")[1])
    return f"{value:.{max(decimals, 0)}f}"


def mib(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else fmt(nbytes / 2**20)


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *values: Any) -> None:
        if len(values) != len(self.columns):
            raise ValueError(f"table {self.title!r} has {len(self.columns)} columns, got {len(values)} values")
        self.rows.append([fmt(v) for v in values])

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines.append("")
            lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """The command that ran this script (``argv``, default the process's), as one could paste it."""
    return " ".join(shlex.quote(a) for a in ["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def report(
    title: str,
    module: str,
    tables: list[Table],
    started: float,
    results: Path | None,
    argv: Sequence[str] | None = None,
) -> str:
    """Print the tables with the machine, the command and its duration; append the same text to ``results``
    unless it is None."""
    info = machine()
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = command_line(module, argv)
    parts = [f"## {title}, {when}", "", f"Command: `{command}` ({time.time() - started:.0f} s)", ""]
    parts += [f"- {key}: {value}" for key, value in info.items()]
    parts.append("")
    parts += [table.markdown() for table in tables]
    text = "\n".join(parts)
    sys.stdout.write(text + "\n")
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        if not results.exists():
            results.write_text(RESULTS_HEADER)
        with open(results, "a") as f:
            f.write("\n" + text)
        logger.info("appended to %s", results)
    return text


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """--results, --no-append and --threads, shared by every script."""
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="Markdown file the tables are appended to (default %(default)s)"
    )
    parser.add_argument("--no-append", action="store_true", help="print the tables only; append nothing")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads of torch (and of FAISS, ONNX Runtime and the servers where they run; default: "
        "each library's own, usually the core count)",
    )


def setup(args: Any) -> Path | None:
    """Logging, threads and allocator settings every script starts with; returns where to append (or None)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs each instruction set it tries
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    global _LOAD_AT_START
    _LOAD_AT_START = _load_average()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return None if args.no_append else args.results


def require_weights_and_manifest(parser: argparse.ArgumentParser, args: Any) -> None:
    """Exit with a sentence unless ``--weights`` is a file and ``--root`` holds a manifest.csv."""
    if not args.weights.is_file():
        parser.exit(2, f"{parser.prog}: --weights {args.weights} is not a file\n")
    if not (args.root / "manifest.csv").is_file():
        parser.exit(2, f"{parser.prog}: {args.root}/manifest.csv is absent\n")


def int_list(text: str) -> list[int]:
    """argparse type: "1,8,32" -> [1, 8, 32]."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 1,8,32, got {text!r}")
    return values
