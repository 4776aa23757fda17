"""An evaluation grid: tasks × methods × budgets × lengths × depths × seeds × modes, and its cells.

A grid is declared in a small TOML or JSON file or on the command line (``tokensieve eval``)::

    # eval.toml
    tasks   = ["passkey", "niah_single"]
    methods = ["snapkv", "h2o", "snapkv[window=32]", "+quest[page=32]:0.125"]   # specs, or "all"
    budgets = ["10%", "25%", 0.5, 256]                   # for the specs that give no budget
    lengths = [512, 1024]
    depths  = [0.0, 0.5, 1.0]
    seeds   = [0, 1]
    modes   = ["agnostic", "aware"]
    haystack = "repeat"                                  # or "text"
    text    = "kjv"                                      # or a path to a UTF-8 text file
    store   = "runs/eval.sqlite"
    chunk   = 512                                        # optional: chunked prefill (docs/PREFILL.md)

Methods are specs (:mod:`tokensieve.spec`): a spec that gives no budget is measured at each of the grid's budgets,
one that gives its own keeps it.

``chunk = N`` (``--chunk N``) prefills every configuration in chunks of ``N`` tokens, re-compressing after each
(``Compressor(chunk=N)``) — except the full-cache baseline, which stays one pass: it is the reference of accuracy
and KL, and a chunked full cache keeps the same entries. A method that cannot score a chunk
(:meth:`~tokensieve.core.method.PrefillMethod.chunk_refusal`) is refused when the grid is built, with its reason.

A *cell* is one measurement: (task and its options, a resolved spec, length, depth, seed, mode, chunk size). Its key
is :meth:`Spec.key` of that workload and the model key, so a rerun finds the cells it already measured; the chunk
size is part of the workload only when it is set, so one-pass cells keep the keys they always had.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters.models import DEFAULT_MODEL
from ..core.budget import Budget
from ..core.capabilities import Request
from ..data.tasks import MODES, Task, get_task
from ..engine import check_chunk
from ..errors import ConfigError
from ..registry import method_names
from ..spec import Spec, split_specs


def _tuple(value: Any, what: str) -> tuple[Any, ...]:
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    if not items:
        raise ConfigError(f"'{what}' is empty: give at least one value.")
    return tuple(items)


def _ints(values: Sequence[Any], what: str, *, minimum: int = 1) -> tuple[int, ...]:
    """Whole numbers; ``1k`` = 1024, ``"0-3"`` = 0, 1, 2, 3."""
    out: list[int] = []
    for v in values:
        s = str(v).strip().lower()
        if isinstance(v, str) and "-" in s[1:]:
            a, b = s.split("-", 1)
            start, end = _ints([a], what, minimum=minimum)[0], _ints([b], what, minimum=minimum)[0]
            if end < start:
                raise ConfigError(f"'{what}': the range {v!r} ends before it starts; write {end}-{start}.")
            out += list(range(start, end + 1))
            continue
        scale = 1024 if s.endswith("k") else 1
        try:
            f = float(s[:-1] if scale > 1 else s) * scale
        except ValueError:
            raise ConfigError(f"'{what}' must be whole numbers (e.g. 512, 1024 or 1k); got {v!r}.") from None
        if isinstance(v, bool) or not f.is_integer() or f < minimum:
            raise ConfigError(f"'{what}' must be whole numbers >= {minimum}; got {v!r}.")
        out.append(int(f))
    return tuple(dict.fromkeys(out))


def _floats(values: Sequence[Any], what: str, lo: float, hi: float) -> tuple[float, ...]:
    out = []
    for v in values:
        try:
            f = float(str(v).rstrip("%")) / (100 if str(v).endswith("%") else 1)
        except ValueError:
            raise ConfigError(f"'{what}' must be numbers in [{lo}, {hi}]; got {v!r}.") from None
        if not (lo <= f <= hi) or math.isnan(f):
            raise ConfigError(f"'{what}' must be in [{lo}, {hi}]; got {v!r}.")
        out.append(f)
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class EvalConfig:
    """A validated evaluation grid (see the module docstring). The full-cache baseline is always added."""

    tasks: tuple[str, ...] = ("passkey",)
    methods: tuple[Spec, ...] = (Spec(),)
    budgets: tuple[Budget, ...] = (Budget.ratio(0.25),)
    lengths: tuple[int, ...] = (1024,)
    depths: tuple[float, ...] = (0.5,)
    seeds: tuple[int, ...] = (0,)
    modes: tuple[str, ...] = ("agnostic",)
    haystack: str = "repeat"
    text: str = "kjv"
    model: str = DEFAULT_MODEL
    store: str = "runs/eval.sqlite"
    threads: int | None = None
    fidelity: bool = True
    shared_prefill: bool = True  # record each prompt's prefill once and replay it for every method that allows it
    chunk: int | None = None  # chunked prefill of every configuration but the full-cache baseline (None: one pass)
    all_methods: bool = False  # `methods = all`: skip registered methods the model cannot run instead of failing
    _task_objs: tuple[Task, ...] = field(default=(), repr=False, compare=False)

    FIELDS = (
        "tasks", "methods", "budgets", "lengths", "depths", "seeds", "modes", "haystack", "text", "model", "store",
        "threads", "fidelity", "chunk", "shared_prefill",
    )  # fmt: skip

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError("No tasks: give at least one (see `tokensieve eval --list-tasks`).")
        tasks = tuple(get_task(t, haystack=self.haystack, text=self.text) for t in self.tasks)
        object.__setattr__(self, "tasks", tuple(t.name for t in tasks))
        object.__setattr__(self, "_task_objs", tasks)
        if not self.methods:
            raise ConfigError("No methods: give at least one registered method (see `tokensieve methods`).")
        if not self.budgets:
            raise ConfigError("No budgets: give at least one, e.g. 0.25 or 256.")
        for what in ("lengths", "seeds"):
            if not getattr(self, what):
                raise ConfigError(f"'{what}' is empty: give at least one value.")
        if not self.depths:
            raise ConfigError("'depths' is empty: give at least one depth in [0, 1].")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ConfigError(f"Unknown mode(s) {bad or '(none)'}: use {' and/or '.join(MODES)}.")
        if any(d < 0 or d > 1 for d in self.depths):
            raise ConfigError("Depths must be in [0, 1] (0 = start of the haystack, 1 = end).")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("threads must be >= 1.")
        if not str(self.store).strip():
            raise ConfigError("Give a results store path (--store runs/eval.sqlite).")
        if self.chunk is not None:
            check_chunk(self.chunk)
            if not self.all_methods:  # `all` drops, with a note, the methods that cannot (tokensieve.eval.runner)
                for m in self.methods:
                    m.check(Request(chunk=self.chunk))

    # ------------------------------------------------------------------------------------------------- build
    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> EvalConfig:
        """Build from a mapping of config-file values or CLI strings (lists or comma-separated strings)."""
        unknown = sorted(set(data) - set(cls.FIELDS))
        if unknown:
            raise ConfigError(f"Unknown config key(s) {', '.join(unknown)}. Valid keys: {', '.join(cls.FIELDS)}.")
        kw: dict[str, Any] = {}
        if "tasks" in data:
            kw["tasks"] = tuple(str(t) for t in _tuple(data["tasks"], "tasks"))
        if "methods" in data:
            raw = data["methods"]
            items = split_specs(raw) if isinstance(raw, str) else _tuple(raw, "methods")
            if any(isinstance(m, str) and m.strip().lower() == "all" for m in items):
                # every registered method (those the model cannot run are dropped by the runner, with a note)
                items = [m for m in items if not (isinstance(m, str) and m.strip().lower() == "all")]
                items += method_names()
                kw["all_methods"] = True
            for m in items:
                if not isinstance(m, (str, Spec)):
                    raise ConfigError(f"'methods' holds specs such as \"snapkv[window=32]\"; got {m!r}.")
            kw["methods"] = tuple(dict.fromkeys(Spec.parse(m) for m in items))
        if "budgets" in data:
            kw["budgets"] = tuple(dict.fromkeys(Budget.parse(b) for b in _tuple(data["budgets"], "budgets")))
        if "lengths" in data:
            kw["lengths"] = _ints(_tuple(data["lengths"], "lengths"), "lengths")
        if "seeds" in data:
            kw["seeds"] = _ints(_tuple(data["seeds"], "seeds"), "seeds", minimum=0)
        if "depths" in data:
            kw["depths"] = _floats(_tuple(data["depths"], "depths"), "depths", 0.0, 1.0)
        if "modes" in data:
            named = [str(m).strip().lower() for m in _tuple(data["modes"], "modes")]
            both = [m for n in named for m in (MODES if n == "both" else (n,))]  # "both": every mode
            kw["modes"] = tuple(dict.fromkeys(both))
        for key in ("haystack", "text", "model", "store"):
            if key in data and data[key] is not None:
                kw[key] = str(data[key])
        if data.get("threads") is not None:
            kw["threads"] = _ints([data["threads"]], "threads")[0]
        if "fidelity" in data and data["fidelity"] is not None:
            kw["fidelity"] = _bool(data["fidelity"], "fidelity")
        if "shared_prefill" in data and data["shared_prefill"] is not None:
            kw["shared_prefill"] = _bool(data["shared_prefill"], "shared_prefill")
        if data.get("chunk") is not None and str(data["chunk"]).strip().lower() not in ("", "none", "0"):
            kw["chunk"] = _ints(_tuple(data["chunk"], "chunk"), "chunk", minimum=2)[0]
        return cls(**kw)

    @classmethod
    def from_file(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> EvalConfig:
        """Read a ``.toml`` or ``.json`` grid file; ``overrides`` (e.g. from the CLI) win over its values."""
        data = dict(read_config_file(path))
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_mapping(data)

    # ------------------------------------------------------------------------------------------------- cells
    @property
    def task_objects(self) -> tuple[Task, ...]:
        return self._task_objs

    def method_list(self) -> list[Spec]:
        """The specs of the grid: the full-cache baseline first (always), then the grid's, without duplicates."""
        return list(dict.fromkeys([Spec(), *self.methods]))

    def specs(self) -> list[Spec]:
        """Every resolved spec to measure: a spec without a budget at each of the grid's budgets."""
        return list(dict.fromkeys(s for m in self.method_list() for s in m.at_budgets(self.budgets)))

    def describe(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks),
            "methods": [m.label for m in self.method_list()],
            "budgets": [str(b) for b in self.budgets],
            "lengths": list(self.lengths),
            "depths": list(self.depths),
            "seeds": list(self.seeds),
            "modes": list(self.modes),
            "haystack": self.haystack,
            "text": self.text,
            "model": self.model,
            **({} if self.chunk is None else {"chunk": self.chunk}),
        }


def _bool(v: Any, what: str) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"'{what}' must be true or false; got {v!r}.")


def read_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"Config file {p} does not exist.")
    raw = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"Config file {p} is not valid JSON: {exc}.") from None
    elif p.suffix.lower() == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            raise ConfigError(f"Reading {p} needs Python >= 3.11 (tomllib); write the grid as JSON instead.") from None
        try:
            data = tomllib.loads(raw)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"Config file {p} is not valid TOML: {exc}.") from None
    else:
        raise ConfigError(f"Config file {p}: use a .toml or .json file.")
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {p} must hold a table of keys (tasks, methods, budgets, …).")
    return data


# ---------------------------------------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class Cell:
    """One measurement. ``depth`` is None for tasks whose samples do not depend on it."""

    task: Task
    spec: Spec  # resolved: every budget given
    length: int
    depth: float | None
    seed: int
    mode: str
    chunk: int | None = None  # chunked prefill (Compressor chunk=); None: one pass

    @property
    def sample_id(self) -> tuple[str, str, int, float | None, int]:
        return (self.task.name, json.dumps(self.task.options(), sort_keys=True), self.length, self.depth, self.seed)

    def workload(self, model: str) -> dict[str, Any]:
        """What the spec is measured on (with the spec, hashed into the cell's key)."""
        return {
            "task": self.task.name,
            "task_options": self.task.options(),
            "length": self.length,
            "depth": self.depth,
            "seed": self.seed,
            "mode": self.mode,
            "model": model,
            **({} if self.chunk is None else {"chunk": self.chunk}),  # one-pass cells keep their keys
        }

    def config(self, model: str) -> dict[str, Any]:
        """The cell's full configuration: every resolved parameter of the spec and the workload."""
        return {"spec": self.spec.to_dict(), **self.workload(model)}

    def key(self, model: str) -> str:
        return self.spec.key(**self.workload(model))


def expand(cfg: EvalConfig) -> tuple[list[Cell], list[str]]:
    """All cells of a grid in run order (sample by sample; within a sample the full cache first), and notes about
    grid points that do not apply (e.g. the perplexity task in the query-aware mode)."""
    cells: list[Cell] = []
    notes: list[str] = []
    specs = cfg.specs()
    for task in cfg.task_objects:
        modes = [m for m in cfg.modes if m in task.modes]
        if not modes:
            notes.append(f"{task.name} supports only the {'/'.join(task.modes)} mode: skipped.")
            continue
        if len(modes) < len(cfg.modes):
            notes.append(f"{task.name} runs in the {'/'.join(modes)} mode only.")
        depths: list[float | None] = list(cfg.depths) if task.uses_depth else [None]
        if not task.uses_depth and len(cfg.depths) > 1:
            notes.append(f"{task.name} does not place a needle: one sample per (length, seed), no depths.")
        for length in cfg.lengths:
            for depth in depths:
                for seed in cfg.seeds:
                    for mode in modes:
                        for spec in specs:
                            chunk = None if spec.is_full else cfg.chunk  # the full-cache reference: one pass
                            cells.append(Cell(task, spec, length, depth, seed, mode, chunk))
    return cells, notes
