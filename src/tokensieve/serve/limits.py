"""What one request, or all of them together, may cost the server: the limits and their defaults.

Every size or cost a request chooses has a limit here, and a request over one is refused with a 4xx whose message
names the limit and the ``tokensieve serve`` flag that sets it (docs/SERVING.md, "Security and limits"). The defaults
are meant to be safe on the machine the server runs on: the KV memory budget is a share of the memory available
when the server starts, never unlimited.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}

KV_SHARE = 0.25  # the default KV budget: this share of the memory available at start
CHARS_PER_TOKEN = 16  # the default character limit of a prompt: this many characters per token of --max-prompt-tokens


def parse_bytes(text: str | int) -> int:
    """``"1GB"``, ``"512MiB"``, ``"2.5GB"`` or a number of bytes → bytes (decimal KB/MB/GB, binary KiB/MiB/GiB)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value: float = text
        unit = ""
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(text))
        if m is None or m.group(2).upper() not in _UNITS:
            raise ConfigError(f"Cannot read a memory size from {text!r}: write e.g. 1GB, 512MB, 256MiB or 1000000.")
        value, unit = float(m.group(1)), m.group(2).upper()
    n = int(value * _UNITS[unit])
    if n <= 0:
        raise ConfigError(f"A memory size must be positive; got {text!r}.")
    return n


def available_memory() -> int | None:
    """Bytes this process may still use: the smaller of the system's available memory (``MemAvailable``) and what
    its cgroup (a container's memory limit) leaves; None where neither can be read."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        try:
            limit_text = Path(limit_file).read_text().strip()
            if limit_text == "max":
                continue
            limit, usage = int(limit_text), int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit < 1 << 60:  # v1 reports "no limit" as a huge number
            found.append(max(0, limit - usage))
    if not found and hasattr(os, "sysconf"):
        with contextlib.suppress(OSError, ValueError):
            found.append(int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE")))
    return min(found) if found else None


def default_kv_memory() -> int:
    """The KV budget when none is given: :data:`KV_SHARE` of the memory available now (1 GB where that cannot be
    read), at least 64 MB."""
    avail = available_memory()
    return max(64 * 10**6, int(KV_SHARE * avail)) if avail else 10**9


def release_memory() -> None:
    """Hand freed memory back to the system after large caches were dropped (a deleted, evicted or expired context):
    collect cycles, then ask glibc's allocator to return its free pages (``malloc_trim``), which it otherwise keeps
    for the process. A no-op where there is no glibc."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


_TRIM: list[Any] = []


def _malloc_trim() -> Any:
    if not _TRIM:
        fn = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            fn = getattr(libc, "malloc_trim", None)
            if fn is not None:
                fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
        except OSError:
            fn = None
        _TRIM.append(fn)
    return _TRIM[0]


@dataclass(frozen=True)
class Limits:
    """Per-request and per-server limits (``tokensieve serve`` flags in brackets).

    Attributes:
        max_body_bytes: the largest request body (``--max-body``): 1 MB.
        max_prompt_chars: the longest text a prompt, a conversation or a document may have, checked before it is
            tokenised (``--max-prompt-chars``); None: :data:`CHARS_PER_TOKEN` characters per token of the longest
            prompt accepted.
        request_timeout: seconds a request may compute — its prefill and its decoding — before it is stopped
            (``--request-timeout``): 300.
        max_prefill_passes: forward passes a prefill may run over the prompt (a method such as KVzip adds passes
            that reconstruct the prompt chunk by chunk; ``--max-prefill-passes``): 64.
        max_contexts: stored contexts held at once (``--max-contexts``): 64; the least recently used is evicted.
        context_memory: bytes all stored contexts may hold (``--context-memory``); None: half the KV budget.
        context_ttl: seconds a stored context may stay unused before it is deleted (``--context-ttl``): 3600.
        max_json_depth: how deeply a request body's arrays and objects may nest: 32.
    """

    max_body_bytes: int = 1_000_000
    max_prompt_chars: int | None = None
    request_timeout: float = 300.0
    max_prefill_passes: int = 64
    max_contexts: int = 64
    context_memory: int | None = None
    context_ttl: float = 3600.0
    max_json_depth: int = 32

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in ("max_prompt_chars", "context_memory"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
                raise ConfigError(f"The server limit {f.name} must be a positive number; got {value!r}.")

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> Limits:
        """Limits from keyword values, None meaning the default (how the command line and Ray replicas pass them)."""
        return cls(**{k: v for k, v in values.items() if v is not None})


__all__ = ["Limits", "available_memory", "default_kv_memory", "parse_bytes", "release_memory"]
