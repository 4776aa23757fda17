"""The results store: one SQLite file for every measurement — accuracy rows (``tokensieve eval``) and speed rows
(``tokensieve bench``) side by side.

One schema, one key rule, one label:

* table ``runs`` — one row per invocation: the tool, its command line, its settings, model, package version,
  threads, cells and cells still to run, and (benchmarks) the machine description;
* tables ``eval`` and ``bench`` — one row per measurement. Both start with the same columns: ``key`` (the primary
  key, :meth:`tokensieve.spec.Spec.key` of the configuration and its workload), ``label`` (the canonical
  :attr:`~tokensieve.spec.Spec.label`), ``method`` (the label without budgets), ``spec`` (every resolved parameter,
  JSON), the budget, model, version, run and time, and ``chunk`` — the chunk size of a chunked prefill
  (``Compressor(chunk=N)``, docs/PREFILL.md), NULL for a one-pass prefill. So an accuracy row and a speed row of the
  same configuration carry the same ``label`` and ``chunk`` and join; rows that differ only by ``chunk`` are
  different configurations (:func:`tokensieve.results.stats.chunk_labelled` gives them distinct labels for reports).

Visual-token pruning (``tokensieve train vlm-eval --store``, ``tokensieve bench --vlm --store``) writes to the same
tables under the same rule: ``label`` is the visual plan's canonical label
(:func:`tokensieve.adapters.vision.visual_label`: ``todre:0.11``, ``vis:random:0.11``, ``full`` for no pruning),
``spec`` is ``{"kind": "visual", "plan": [...]}`` (:func:`visual_columns`, :func:`is_visual`) and the key is
:func:`visual_key` — the same SHA-256 rule as :meth:`~tokensieve.spec.Spec.key`. docs/VLM.md says what each column of
those rows holds.

Columns added after schema 2 was first released (:data:`ADDED`: ``chunk``; ``extra``, a JSON object of a row's
measurements that have no column of their own, e.g. a VLM prefill's vision-tower seconds and FLOPs; in ``bench``,
``prefill_attn_s`` and ``compile_s``, the prefill's attention and FlexAttention compile seconds) are added to an older
store
when it is opened for writing (``ALTER TABLE … ADD COLUMN``: its rows read NULL, i.e. one pass), and read as None
from an older store opened read-only; the schema version stays 2, so older tokensieve versions keep reading and
writing a migrated store.

A row is committed as soon as it is measured, in its own transaction, so a run killed at any moment (even with
SIGKILL) loses at most the measurement in progress; a restarted run skips every key already present. Rows are only
ever inserted, never replaced: a key that is already stored keeps its first row.

Several processes may write one store at once (two ``tokensieve eval`` runs, a benchmark and an evaluation, workers
of a cluster): the file is in WAL mode with a busy timeout, a row is written with ``INSERT … ON CONFLICT DO
NOTHING``, and a runner *claims* a cell (table ``claims``) before measuring it, so each cell is measured once. A
claim ends when its row is written or its runner closes the store; a claim whose process is gone (same host) or
whose lease has run out (:data:`CLAIM_LEASE`, another host) is taken over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sqlite3
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..core.budget import Budget
from ..errors import ConfigError
from ..spec import Spec

SCHEMA_VERSION = 2
BUSY_TIMEOUT = 60.0  # seconds a writer waits for another's transaction before giving up
CLAIM_LEASE = 6 * 3600.0  # seconds a claim of a runner on another host is honoured

# (column, SQL type) shared by every measurement table; `key` is the primary key.
COMMON: tuple[tuple[str, str], ...] = (
    ("key", "TEXT PRIMARY KEY"),
    ("label", "TEXT NOT NULL"),
    ("method", "TEXT NOT NULL"),
    ("spec", "TEXT NOT NULL"),
    ("budget", "TEXT NOT NULL"),
    ("budget_kind", "TEXT"),
    ("budget_value", "REAL"),
    ("model", "TEXT NOT NULL"),
    ("version", "TEXT NOT NULL"),
    ("created", "REAL NOT NULL"),
    ("run_id", "INTEGER"),
    ("threads", "INTEGER"),
    ("chunk", "INTEGER"),  # chunked prefill: the chunk size in tokens; NULL = one pass
)

# Columns added to schema 2 after its release: added on opening an older store for writing, None when reading one.
ADDED: frozenset[str] = frozenset({"chunk", "prefill_attn_s", "compile_s", "extra"})

EVAL: tuple[tuple[str, str], ...] = (
    *COMMON,
    ("config", "TEXT NOT NULL"),
    ("task", "TEXT NOT NULL"),
    ("task_options", "TEXT"),
    ("length", "INTEGER NOT NULL"),
    ("depth", "REAL"),
    ("seed", "INTEGER NOT NULL"),
    ("mode", "TEXT NOT NULL"),
    ("metric", "TEXT NOT NULL"),
    ("score", "REAL"),
    ("output", "TEXT"),
    ("answers", "TEXT"),
    ("prompt_tokens", "INTEGER"),
    ("context_tokens", "INTEGER"),
    ("kl", "REAL"),
    ("kl_max", "REAL"),
    ("top1", "REAL"),
    ("fidelity_tokens", "INTEGER"),
    ("answer_logprob", "REAL"),
    ("answer_tokens", "INTEGER"),
    ("prefill_s", "REAL"),
    ("compress_s", "REAL"),
    ("decode_s", "REAL"),
    ("decode_tokens", "INTEGER"),
    ("cell_s", "REAL"),
    ("kv_bytes", "INTEGER"),
    ("stored_entries", "INTEGER"),
    ("full_kv_bytes", "INTEGER"),
    ("full_entries", "INTEGER"),
    ("extra", "TEXT"),  # JSON: measurements without a column of their own (added after schema 2)
)

BENCH: tuple[tuple[str, str], ...] = (
    *COMMON,
    ("prefill", "TEXT NOT NULL"),  # the prefill part of the label
    ("decode", "TEXT"),  # the decode part (method and parameters), if any
    ("decode_budget", "TEXT"),
    ("length", "INTEGER NOT NULL"),
    ("batch", "INTEGER NOT NULL"),
    ("rep", "INTEGER NOT NULL"),
    ("prefill_s", "REAL"),
    ("compress_s", "REAL"),
    ("ttft_s", "REAL"),
    ("decode_s", "REAL"),
    ("steps", "INTEGER"),
    ("tok_s", "REAL"),
    ("attn_ms", "REAL"),  # attention time per decode step, all layers
    ("bytes_read", "REAL"),  # KV (+ page metadata) bytes read per decode step, all layers and sequences
    ("kv_bytes", "INTEGER"),
    ("alloc_bytes", "INTEGER"),
    ("meta_bytes", "INTEGER"),
    ("stored_entries", "INTEGER"),
    ("prefill_peak_rss", "INTEGER"),  # process resident memory, highest while prefilling (weights included)
    ("decode_peak_rss", "INTEGER"),  # highest while decoding
    ("prefill_attn_s", "REAL"),  # wall time inside the prefill's attention calls, all layers (added after schema 2)
    ("compile_s", "REAL"),  # FlexAttention compile seconds inside the timed prefill (added after schema 2)
    ("extra", "TEXT"),  # JSON: measurements without a column of their own (added after schema 2)
)

TABLES: dict[str, tuple[tuple[str, str], ...]] = {"eval": EVAL, "bench": BENCH}
RUNS = (
    "id INTEGER PRIMARY KEY AUTOINCREMENT, tool TEXT NOT NULL, started REAL, command TEXT, config TEXT, model TEXT, "
    "version TEXT, threads INTEGER, cells INTEGER, todo INTEGER, info TEXT"
)
CLAIMS = (
    "tbl TEXT NOT NULL, key TEXT NOT NULL, owner TEXT NOT NULL, host TEXT, pid INTEGER, started TEXT, "
    "expires REAL, PRIMARY KEY (tbl, key)"
)


def columns(table: str) -> tuple[str, ...]:
    return tuple(c for c, _ in _table(table))


def _table(table: str) -> tuple[tuple[str, str], ...]:
    if table not in TABLES:
        raise ValueError(f"unknown results table {table!r}; tables: {', '.join(TABLES)}")
    return TABLES[table]


class ResultStore:
    """A SQLite results store (see the module docstring).

    ``ResultStore(path)`` creates the file (and its folder) if needed and checks that it can be written, so a bad
    path fails before any work starts. ``readonly=True`` opens an existing store for reports — also one on a
    read-only disk or folder, or one the user may only read. Either way a damaged file (SQLite's integrity check)
    is refused when it is opened, before anything is read from it or written to it.
    """

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path).expanduser()
        self.readonly = readonly
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"  # this writer's claims
        if readonly:
            if not self.path.is_file():
                raise ConfigError(
                    f"No results store at {self.path}: run `tokensieve eval --store {self.path}` or "
                    f"`tokensieve bench --store {self.path}` first."
                )
            self._conn = self._open_readonly()
            self._check_intact()
            self._check_schema()
            return
        if self.path.is_dir():
            raise ConfigError(
                f"The results store {self.path} is a directory: give a file path such as runs/eval.sqlite."
            )
        blocker = next((p for p in self.path.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise ConfigError(
                f"Cannot create the results store {self.path}: {blocker} is a file, not a folder. "
                "Choose a writable path with --store."
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"Cannot create the folder of the results store {self.path}: {exc.strerror or exc}. "
                "Choose a writable path with --store."
            ) from None
        self._conn = self._connect(str(self.path))
        self._check_intact()
        try:
            self._wal()  # readers never block the writer, nor it them
            self._create()
            with self._conn:  # a write transaction proves the file is writable and not locked
                self._conn.execute("INSERT OR REPLACE INTO meta(k, v) VALUES ('checked', ?)", (str(time.time()),))
        except sqlite3.Error as exc:
            self._conn.close()
            raise ConfigError(
                f"Cannot write the results store {self.path}: {exc}. Choose a writable path with --store."
            ) from None

    # ------------------------------------------------------------------------------------------------- set-up
    def _wal(self) -> None:
        """Switch the file to WAL journaling once. SQLite answers a journal-mode change that meets another
        connection's lock with "database is locked" at once, without waiting (two runs opening a new store at the same
        moment), so retry until the other connection is done, up to the busy timeout."""
        deadline = time.monotonic() + BUSY_TIMEOUT
        while True:
            try:
                if self._conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    self._conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _open_readonly(self) -> sqlite3.Connection:
        """A read-only connection. A store in WAL mode needs its ``-shm`` file, which a reader cannot create in a
        folder it may not write: it is then opened as immutable (nothing may write it meanwhile — true of a read-only
        place)."""
        uri = "file:" + urllib.parse.quote(str(self.path.resolve()))
        try:
            conn = self._connect(f"{uri}?mode=ro", uri=True)
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return conn
        except ConfigError:
            return self._connect(f"{uri}?mode=ro&immutable=1", uri=True)

    def _check_intact(self) -> None:
        """Refuse a damaged file (SQLite's quick integrity check) before anything is read or written: a truncated or
        overwritten store would otherwise give wrong counts, or take new rows into a broken file."""
        try:
            result = [r[0] for r in self._conn.execute("PRAGMA quick_check").fetchall()]
        except sqlite3.DatabaseError as exc:
            result = [str(exc)]
        if result != ["ok"]:
            self._conn.close()
            raise ConfigError(
                f"The results store {self.path} is damaged ({'; '.join(map(str, result[:3]))}): restore it from a "
                "copy, or use another --store path."
            )

    def _connect(self, target: str, *, uri: bool = False) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(target, uri=uri, timeout=BUSY_TIMEOUT, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as exc:
            raise ConfigError(f"Cannot open the results store {self.path}: {exc}.") from None
        conn.row_factory = sqlite3.Row
        return conn

    def _create(self) -> None:
        # One writer at a time (BEGIN IMMEDIATE), so two processes creating one new store do not collide.
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not tables - {"sqlite_sequence"}:  # a new file: this schema
                self._conn.execute("CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT)")
                self._conn.execute("INSERT INTO meta(k, v) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        self._check_version()
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute(f"CREATE TABLE IF NOT EXISTS runs ({RUNS})")
            self._conn.execute(f"CREATE TABLE IF NOT EXISTS claims ({CLAIMS})")
            if "started" not in {r[1] for r in self._conn.execute("PRAGMA table_info(claims)")}:
                self._conn.execute("ALTER TABLE claims ADD COLUMN started TEXT")  # a store of the first claims table
            for table, cols in TABLES.items():
                body = ",\n  ".join(f"{c} {t}" for c, t in cols)
                self._conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (\n  {body}\n)")
                self._conn.execute(f"CREATE INDEX IF NOT EXISTS {table}_label ON {table}(label)")
                have = {r[1] for r in self._conn.execute(f"PRAGMA table_info({table})")}
                for c, t in cols:
                    if c in ADDED and c not in have:  # a store written before this column existed: migrate
                        self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {c} {t}")
        self._check_schema()

    def _check_version(self) -> None:
        try:
            row = self._conn.execute("SELECT v FROM meta WHERE k = 'schema'").fetchone()
        except sqlite3.Error as exc:
            raise ConfigError(f"{self.path} is not a tokensieve results store: {exc}.") from None
        if row is None or row[0] != str(SCHEMA_VERSION):
            raise ConfigError(
                f"{self.path} is not a tokensieve results store of schema {SCHEMA_VERSION} (an older tokensieve "
                "wrote it, or another program): use another --store path."
            )

    def _check_schema(self) -> None:
        self._check_version()
        for table, cols in TABLES.items():
            have = {r[1] for r in self._conn.execute(f"PRAGMA table_info({table})")}
            if {c for c, _ in cols} - have - ADDED:
                raise ConfigError(
                    f"{self.path} is not a tokensieve results store of schema {SCHEMA_VERSION} (table {table} "
                    "differs); use another --store path."
                )

    def close(self) -> None:
        if not self.readonly:
            with contextlib.suppress(sqlite3.Error):  # a claim left behind is taken over later
                self.release()
        self._conn.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------ writing
    def start_run(
        self,
        *,
        tool: str,
        command: str,
        config: Mapping[str, Any],
        model: str,
        version: str,
        threads: int,
        cells: int,
        todo: int,
        info: Mapping[str, Any] | None = None,
    ) -> int:
        """Record an invocation; returns its id (``run_id`` of its rows)."""
        with self._conn:
            cur = self._conn.execute(
                "INSERT INTO runs(tool, started, command, config, model, version, threads, cells, todo, info) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (tool, time.time(), command, json.dumps(config, sort_keys=True, default=str), model, version,
                 threads, cells, todo, json.dumps(info or {}, sort_keys=True, default=str)),
            )  # fmt: skip
        return int(cur.lastrowid or 0)

    def add(self, table: str, row: Mapping[str, Any]) -> bool:
        """Insert one measurement, end this writer's claim on its key, and commit. Returns False (and keeps the
        stored row) when the key is already stored, e.g. by another process: rows are never overwritten."""
        names = columns(table)
        unknown = set(row) - set(names)
        if unknown:
            raise ValueError(f"unknown {table} columns: {sorted(unknown)}")
        cols = [c for c in names if c in row]
        values = [_sql(row[c]) for c in cols]
        sql = (f"INSERT INTO {table}({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)}) "
               "ON CONFLICT(key) DO NOTHING")  # fmt: skip
        with self._conn:
            cur = self._conn.execute(sql, values)
            self._conn.execute("DELETE FROM claims WHERE tbl = ? AND key = ?", (table, row.get("key")))
        return cur.rowcount == 1

    def claim(self, table: str, key: str, *, lease: float = CLAIM_LEASE) -> bool:
        """Claim the measurement ``key`` of ``table`` for this writer before measuring it.

        False when its row is already stored or another live writer holds the claim (the caller skips the cell);
        True when it is this writer's to measure (a new claim, its own, or one taken over from a writer that is gone:
        a process that no longer runs on this host, or a lease run out).
        """
        _table(table)
        now = time.time()
        host = socket.gethostname()
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            if self._conn.execute(f"SELECT 1 FROM {table} WHERE key = ?", (key,)).fetchone() is not None:
                return False
            held = self._conn.execute(
                "SELECT owner, host, pid, started, expires FROM claims WHERE tbl = ? AND key = ?", (table, key)
            ).fetchone()
            if held is not None and held["owner"] != self.owner and not _stale(held, now, host):
                return False
            self._conn.execute(
                "INSERT INTO claims(tbl, key, owner, host, pid, started, expires) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(tbl, key) DO UPDATE SET owner = excluded.owner, host = excluded.host, "
                "pid = excluded.pid, started = excluded.started, expires = excluded.expires",
                (table, key, self.owner, host, os.getpid(), _started(os.getpid()), now + lease),
            )
        return True

    def release(self) -> None:
        """End every claim of this writer (its cells not measured become free for others)."""
        with self._conn:
            self._conn.execute("DELETE FROM claims WHERE owner = ?", (self.owner,))

    # ------------------------------------------------------------------------------------------------ reading
    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """A read that meets damage the open-time check missed is a :class:`ConfigError`, not a raw sqlite error."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            raise ConfigError(
                f"Cannot read the results store {self.path}: {exc}. Restore it from a copy, or use another --store."
            ) from None

    def keys(self, table: str) -> set[str]:
        _table(table)
        with self._reading():
            return {r[0] for r in self._conn.execute(f"SELECT key FROM {table}")}

    def has(self, table: str, key: str) -> bool:
        _table(table)
        with self._reading():
            return self._conn.execute(f"SELECT 1 FROM {table} WHERE key = ?", (key,)).fetchone() is not None

    def count(self, table: str) -> int:
        _table(table)
        with self._reading():
            return int(self._conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])

    def rows(self, table: str, where: str = "", params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        """Rows of ``table`` in the order they were measured (``where``: an SQL condition with ``?`` params)."""
        _table(table)
        sql = f"SELECT * FROM {table}" + (f" WHERE {where}" if where else "") + " ORDER BY created"
        with self._reading():
            rows = [dict(r) for r in self._conn.execute(sql, tuple(params))]
        added = ADDED & set(columns(table))
        for r in rows:  # an older store opened read-only lacks the columns added since: they read as None
            for c in added:
                r.setdefault(c, None)
        return rows

    def runs(self, tool: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM runs" + (" WHERE tool = ?" if tool else "") + " ORDER BY id"
        with self._reading():
            out = [dict(r) for r in self._conn.execute(sql, (tool,) if tool else ())]
        for r in out:
            r["info"] = json.loads(r["info"]) if r.get("info") else {}
        return out


def _stale(claim: sqlite3.Row, now: float, host: str) -> bool:
    """A claim whose lease ran out, or whose process no longer runs on this host (its pid gone, or reused by a
    process started at another time)."""
    if claim["expires"] is None or float(claim["expires"]) < now:
        return True
    if claim["host"] == host and claim["pid"] is not None:
        return not _alive(int(claim["pid"]), claim["started"])
    return False


def _started(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, Linux ``/proc``), to tell a reused pid apart; None where
    the platform does not say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # after the command name, which may hold spaces
    return fields[19] if len(fields) > 19 else None  # field 22 of stat(5): starttime


def _alive(pid: int, started: str | None = None) -> bool:
    if started is not None and Path("/proc/self/stat").exists():
        return _started(pid) == started  # None when the pid is gone
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:  # pragma: no cover - e.g. a platform without signals: trust the lease
        return True
    return True


def _sql(v: Any) -> Any:
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True, default=str)
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float) and v != v:  # NaN → NULL
        return None
    return v


def spec_columns(spec: Spec) -> dict[str, Any]:
    """The columns every measurement row has for its configuration: label, method (the label without budgets),
    the resolved spec as JSON, and the budget (shown as ``25%``; ``100%`` for the full cache)."""
    primary = spec.budget or spec.decode_budget or Budget.ratio(1.0)
    return {
        "label": spec.label,
        "method": spec.family,
        "spec": spec.to_dict(),
        "budget": spec.budget_text,
        "budget_kind": primary.kind,
        "budget_value": float(primary.value),
    }


# ---------------------------------------------------------------------------------------------- visual plans
VISUAL = "visual"  # the ``kind`` of a visual plan's ``spec`` JSON


def visual_spec_dict(spec: str | None) -> dict[str, Any]:
    """Every resolved parameter of a visual plan (defaults and companions included) and its budgets, JSON-ready:
    ``{"kind": "visual", "plan": [{"stage", "method": {"name", "params"}, "budget"}, ...]}``; ``full``: an empty
    plan."""
    from ..spec import visual_plan

    return {"kind": VISUAL, "plan": visual_plan(spec).to_list()}


def visual_key(spec: str | None, **workload: Any) -> str:
    """The key of a measurement of a visual plan on a workload (model, scene and question, or benchmark prompt and
    repetition …): the SHA-256 rule of :meth:`tokensieve.spec.Spec.key` over :func:`visual_spec_dict` and the
    workload."""
    if "spec" in workload:
        raise ValueError("'spec' is reserved in a key's workload")
    blob = json.dumps({"spec": visual_spec_dict(spec), **workload}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def visual_columns(spec: str | None) -> dict[str, Any]:
    """:func:`spec_columns` of a visual plan (``"todre:0.11"``, ``"pool:64/fastv:0.5"``, ``"full"``): the canonical
    label, the method (the label without budgets), the resolved plan as JSON, and the budget — every named stage's
    budget (``11%``, ``64 tok``; ``100%`` for no pruning), the first one's kind and value."""
    from ..spec import visual_label, visual_plan

    named = visual_plan(spec).named
    primary = named[0].budget if named else Budget.ratio(1.0)
    return {
        "label": visual_label(spec),
        "method": visual_label(spec, budgets=False),
        "spec": visual_spec_dict(spec),
        "budget": " + ".join(str(s.budget) for s in named) or "100%",
        "budget_kind": primary.kind,
        "budget_value": float(primary.value),
    }


# ------------------------------------------------------------------------------------- diffusion transformers
DIT = "dit"  # the ``kind`` of a DiT method's ``spec`` JSON


def dit_spec_dict(spec: str | Any) -> dict[str, Any]:
    """Every resolved parameter of a DiT method, JSON-ready: ``{"kind": "dit", "method": {"name", "params"}}``."""
    from ..spec import parse_dit_spec

    method = parse_dit_spec(spec)
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in method.params().items()}
    return {"kind": DIT, "method": {"name": method.name, "params": params}}


def dit_key(spec: str | Any, **workload: Any) -> str:
    """The key of a measurement of a DiT method on a workload: the SHA-256 rule of :meth:`tokensieve.spec.Spec.key`
    over :func:`dit_spec_dict` and the workload."""
    if "spec" in workload:
        raise ValueError("'spec' is reserved in a key's workload")
    blob = json.dumps({"spec": dit_spec_dict(spec), **workload}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def dit_columns(spec: str | Any) -> dict[str, Any]:
    """:func:`spec_columns` of a DiT method (``"svg:0.3"``, ``"radial"``, ``"full"``): the canonical label, the method
    (its name), the resolved parameters as JSON, and the budget — the ``:value`` of a method that takes one
    (``30%``), else ``—`` (a threshold method: its measured density is in the row)."""
    from ..spec import parse_dit_spec

    method = parse_dit_spec(spec)
    knob = type(method).budget_param
    value = getattr(method, knob) if knob else None
    return {
        "label": method.label(),
        "method": method.name,
        "spec": dit_spec_dict(method),
        "budget": "100%" if method.name == "full" else (f"{value:.0%}" if isinstance(value, float) else "—"),
        "budget_kind": "ratio" if isinstance(value, float) or method.name == "full" else None,
        "budget_value": 1.0 if method.name == "full" else (float(value) if isinstance(value, float) else None),
    }


def is_dit(row: Mapping[str, Any]) -> bool:
    """Whether a stored row measures a DiT method (its ``spec`` JSON has ``"kind": "dit"``)."""
    spec = row.get("spec")
    if isinstance(spec, str):
        if f'"kind": "{DIT}"' not in spec and f'"kind":"{DIT}"' not in spec:
            return False
        try:
            spec = json.loads(spec)
        except ValueError:
            return False
    return isinstance(spec, dict) and spec.get("kind") == DIT


def is_visual(row: Mapping[str, Any]) -> bool:
    """Whether a stored row measures a visual plan (its ``spec`` JSON has ``"kind": "visual"``)."""
    spec = row.get("spec")
    if isinstance(spec, str):
        if VISUAL not in spec:
            return False
        try:
            spec = json.loads(spec)
        except ValueError:
            return False
    return isinstance(spec, dict) and spec.get("kind") == VISUAL


# ---------------------------------------------------------------------------------------------- kernel paths
KERNEL = "kernel"  # the ``kind`` of a kernel measurement's ``spec`` JSON (``tokensieve bench --kernels``)


def kernel_spec_dict(path: str, **params: Any) -> dict[str, Any]:
    """What a kernel row measures: ``{"kind": "kernel", "path": ..., **params}`` (geometry, budget, page, backend)."""
    return {"kind": KERNEL, "path": path, **params}


def kernel_key(spec: Mapping[str, Any], **workload: Any) -> str:
    """The key of a kernel measurement (length, batch, dtype, repetition, threads): the SHA-256 rule of
    :meth:`tokensieve.spec.Spec.key` over its spec dict and the workload."""
    if "spec" in workload:
        raise ValueError("'spec' is reserved in a key's workload")
    blob = json.dumps({"spec": dict(spec), **workload}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def is_kernel(row: Mapping[str, Any]) -> bool:
    """Whether a stored row measures a kernel path on synthetic tensors (its ``spec`` JSON has ``"kind": "kernel"``)."""
    spec = row.get("spec")
    if isinstance(spec, str):
        if KERNEL not in spec:
            return False
        try:
            spec = json.loads(spec)
        except ValueError:
            return False
    return isinstance(spec, dict) and spec.get("kind") == KERNEL
