"""The machine: memory bandwidth, process memory, and a description to print next to every figure."""

from __future__ import annotations

import ctypes
import os
import platform
import threading
import time
from types import TracebackType
from typing import Any

import psutil
import torch


def measure_bandwidth(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of ``repeats`` sums over an ``n_bytes`` float32 tensor.

    Decoding is memory-bound (every step reads the weights and the KV cache), so this is the speed limit the
    benchmark compares against.
    """
    x = torch.ones(n_bytes // 4, dtype=torch.float32)
    x.sum()  # touch the pages
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    del x
    return n_bytes / best


def describe_machine() -> dict[str, str | int]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count() or 0,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "memory_gib": round(psutil.virtual_memory().total / 2**30),
    }


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return None


def return_memory_promptly() -> bool:
    """Ask glibc to hand large freed blocks back to the system at once (a fixed 128 KiB mmap threshold instead of
    the adaptive one), so resident memory follows live tensors. Returns False where that is not possible."""
    libc = _libc()
    if libc is None:
        return False
    m_mmap_threshold = -3
    return bool(libc.mallopt(m_mmap_threshold, 128 * 1024))


def release_free_memory() -> None:
    """Return freed heap memory to the system before a measurement starts (glibc's malloc_trim)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class PeakRSS:
    """Sample this process's resident memory every ``interval`` seconds while the block runs.

    ``peak`` is the highest RSS seen, ``start`` the RSS when the block began; ``peak - start`` is what the block
    added. (PyTorch's CPU allocator returns large blocks to the system, so RSS tracks live tensors.)
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, int(proc.memory_info().rss))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        release_free_memory()
        self.start = self.peak = rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss())

    @property
    def added(self) -> int:
        return self.peak - self.start
