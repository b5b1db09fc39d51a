"""Shared pieces of the benchmark suite: interleaved timing, the environment record, tables.

Every figure the suite reports next to a peer is a ratio of two measurements taken in the same run,
interleaved round by round: on a shared machine the background load changes from second to second, and
a peer timed a minute later is not a peer. Each round times every peer once (the order rotates between
rounds, so no peer always runs first), and a ratio is the median over rounds of the per-round ratios.
On CPU each sample also records the process's CPU time, which is unmoved by time slices lost to other
processes: when wall-clock ratios scatter, the CPU-time ratio says whether the difference is real.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch


def optional_transformers():
    """The transformers package, or None: it is an optional dependency of the benchmarks (the peer model)."""
    try:
        import transformers
    except ImportError:
        return None
    return transformers


PRECISIONS = ("float32", "bf16")  # what a section can measure in; bf16 = torch.autocast to bfloat16 (bf16-mixed)


def precisions_for(choice: str, device: torch.device) -> tuple[str, ...]:
    """The precisions --precision names: float32, bf16, both, or auto (CUDA: bf16; CPU: float32, and bf16 too
    where the processor multiplies it natively, as the trainer's precision=auto decides)."""
    if choice == "both":
        return PRECISIONS
    if choice != "auto":
        return (choice,)
    if device.type == "cuda":
        return ("bf16",)
    from minillm.precision import native_bf16_cpu

    return PRECISIONS if native_bf16_cpu() else ("float32",)


def autocast(device: torch.device, precision: str):
    """The context a peer computes in: torch.autocast to bfloat16 under bf16 (float32 master weights, as
    Lightning's bf16-mixed), nothing under float32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Settings:
    """What every section gets: where to run, how long to measure, in which precisions, and the transformers
    peer (or None)."""

    device: torch.device
    quick: bool
    rounds: int
    min_sample_s: float
    transformers: Optional[Any]
    precisions: tuple[str, ...] = ("float32",)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds per call of one peer, one entry per round."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    def as_dict(self) -> dict:
        return {"median_s": self.median, "min_s": min(self.wall), "rounds_s": self.wall,
                "cpu_median_s": statistics.median(self.cpu)}


def sample(fn: Callable[[], object], calls: int, device: torch.device) -> tuple[float, float]:
    """(wall, CPU) seconds per call, over `calls` calls of fn."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - wall) / calls, (time.process_time() - cpu) / calls


def time_samplers(samplers: dict[str, Callable[[int], tuple[float, float]]], rounds: int,
                  min_sample_s: float) -> dict[str, Timing]:
    """Time each peer `rounds` times, interleaved; a sample repeats a call until it lasts min_sample_s.
    samplers[name](calls) runs that many calls and returns (wall, CPU) seconds per call."""
    calls = {}
    for name, run_calls in samplers.items():  # warm-up (allocator, kernels, caches), then size the sample
        run_calls(1)
        wall, _ = run_calls(1)
        calls[name] = max(1, int(min_sample_s / max(wall, 1e-6)))
    timings = {name: Timing() for name in samplers}
    names = list(samplers)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            wall, cpu = samplers[name](calls[name])
            timings[name].wall.append(wall)
            timings[name].cpu.append(cpu)
    return timings


def time_peers(peers: dict[str, Callable[[], object]], device: torch.device, rounds: int,
               min_sample_s: float) -> dict[str, Timing]:
    """time_samplers over callables of this process."""
    return time_samplers({name: (lambda calls, fn=fn: sample(fn, calls, device)) for name, fn in peers.items()},
                         rounds, min_sample_s)


class PeerProcess:
    """One peer in a process of its own, driven round by round from this one.

    Peers that allocate much (a whole training step) slow one another down when they share a process:
    what a fresh allocation costs depends on what the others left in the heap. On 2 CPU cores a
    transformers step measured beside our models ran 1.05x to 1.3x slower than alone, from run to run.
    Only one peer runs at a time, so they never compete for the cores. A sample starts with one untimed
    call: the first step after an idle turn pays to fault its memory back in (up to 1.4x on a VM), and
    a training run is a stream of steps, so the steady state is what a sample times.

    build(*args) runs in the child and returns (step, info): the callable to time and a dict of facts
    about it (parameter count...); build must be a module-level function, so that it pickles by name.
    """

    def __init__(self, build: Callable, args: tuple, device: torch.device, timeout_s: float = 1800.0):
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, build, args, torch.get_num_threads(), device),
                                        daemon=True)
        self._process.start()
        child.close()
        self._timeout_s = timeout_s
        try:
            self.info = self._ask("info")
        except BaseException:
            self.close()
            raise

    def _ask(self, *request):
        try:
            self._conn.send(request)
            if not self._conn.poll(self._timeout_s):
                raise RuntimeError(f"benchmark peer process gave no answer to {request[0]!r} in {self._timeout_s:.0f} s")
            status, value = self._conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            self._process.join(timeout=5)
            raise RuntimeError(f"benchmark peer process died (exit code {self._process.exitcode}) "
                               f"during {request[0]!r}") from None
        if status == "error":
            raise RuntimeError(f"benchmark peer process failed:\n{value}")
        return value

    def sample(self, calls: int) -> tuple[float, float]:
        return self._ask("sample", calls)

    def apply(self, fn: Callable):
        """fn(step) in the child (fn module-level), e.g. a profile of the step."""
        return self._ask("apply", fn)

    def close(self) -> None:
        try:
            self._conn.send(("close",))
        except (BrokenPipeError, OSError):
            pass
        self._process.join(timeout=60)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()


@contextlib.contextmanager
def peer_processes(builds: dict[str, tuple[Callable, tuple]], device: torch.device):
    """{peer: PeerProcess(build, args)} for the block's duration; every process started is closed after it."""
    workers = {}
    try:
        for peer, (build, args) in builds.items():
            workers[peer] = PeerProcess(build, args, device)
        yield workers
    finally:
        for worker in workers.values():
            worker.close()


def _serve(conn, build: Callable, args: tuple, threads: int, device: torch.device) -> None:
    import traceback

    torch.set_num_threads(threads)
    try:
        step, info = build(*args)
    except Exception:
        step, info = None, traceback.format_exc()
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the parent went away
            return
        if request[0] == "close":
            return
        try:
            if step is None:
                raise RuntimeError(info)
            if request[0] == "info":
                reply = info
            elif request[0] == "sample":
                step()  # untimed: back to the steady state after the idle turn (see PeerProcess)
                reply = sample(step, request[1], device)
            else:
                reply = request[1](step)
            conn.send(("ok", reply))
        except Exception:
            conn.send(("error", traceback.format_exc()))


def speedup(timings: dict[str, Timing], ours: str, peer: str) -> dict:
    """How many times faster `ours` ran than `peer`: median of the per-round ratios (wall clock and CPU time)."""
    a, b = timings[ours], timings[peer]
    return {"wall": statistics.median(p / o for p, o in zip(b.wall, a.wall)),
            "cpu": statistics.median(p / o for p, o in zip(b.cpu, a.cpu))}


def cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def environment(device: torch.device) -> dict:
    from minillm.precision import native_bf16_cpu

    transformers = optional_transformers()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__ if transformers else None,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "native_bf16_cpu": native_bf16_cpu(),  # "AMX", "AVX-512 BF16" or None (bf16 emulated)
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def print_table(title: str, header: list[str], rows: list[list], notes: tuple[str, ...] = ()) -> None:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths))))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    for note in notes:
        print(f"  {note}")
    sys.stdout.flush()


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


# ----------------------------------------------------------------------------------------------
# Peak memory on CPU, where torch keeps no allocation statistics


def probe_in_fresh_process(script: str, cases: list, quick: bool = False) -> list:
    """Run `script --probe CASES THREADS [--quick]` in a fresh process and return the JSON list it prints last.

    glibc's mmap threshold is pinned at 64 KiB there, so that freed tensors leave the resident set at
    once and the high-water mark measures what one call holds at its peak.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, script, "--probe", json.dumps(cases), str(torch.get_num_threads()),
                          *(["--quick"] if quick else [])], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def resident_growth(call: Callable[[], object]) -> int:
    """Bytes the resident set grew by during call(): its high-water mark, reset just before, minus where it
    started. One warm-up call first (threads, kernels, caches), all of it freed before the measured one."""

    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    call()
    before = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark to the current resident set
        f.write("5")
    call()
    return max(0, status("VmHWM:") - before)
