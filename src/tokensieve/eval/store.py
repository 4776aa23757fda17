"""The results store: one SQLite file, one row per measured cell.

Every row carries its cell's full configuration (as JSON and as columns), the model, the package version and a
timestamp next to what was measured. A row is committed as soon as its cell finishes, in its own transaction, so a
run killed at any moment (even with SIGKILL) loses at most the cell in progress; a restarted run skips every key
already present. Rows are only ever inserted, never replaced.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import closing
from pathlib import Path
from typing import Any

from ..errors import ConfigError

SCHEMA_VERSION = 1

# (column, SQL type); `key` is the primary key.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("key", "TEXT PRIMARY KEY"),
    ("config", "TEXT NOT NULL"),
    ("model", "TEXT NOT NULL"),
    ("version", "TEXT NOT NULL"),
    ("created", "REAL NOT NULL"),
    ("run_id", "INTEGER"),
    ("task", "TEXT NOT NULL"),
    ("task_options", "TEXT"),
    ("method", "TEXT NOT NULL"),
    ("method_label", "TEXT NOT NULL"),
    ("params", "TEXT"),
    ("budget", "TEXT NOT NULL"),
    ("budget_kind", "TEXT NOT NULL"),
    ("budget_value", "REAL NOT NULL"),
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
    ("threads", "INTEGER"),
)
COLUMN_NAMES = tuple(c for c, _ in COLUMNS)


class ResultStore:
    """A SQLite results store.

    ``ResultStore(path)`` creates the file (and its folder) if needed and checks that it can be written, so a bad
    path fails before any work starts. ``readonly=True`` opens an existing store for reports.
    """

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path).expanduser()
        self.readonly = readonly
        if readonly:
            if not self.path.is_file():
                raise ConfigError(f"No results store at {self.path}: run `tokensieve eval --store {self.path}` first.")
            self._conn = self._connect(f"file:{self.path}?mode=ro", uri=True)
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
        try:
            self._create()
            with self._conn:  # a write transaction proves the file is writable and not locked
                self._conn.execute("INSERT OR REPLACE INTO meta(k, v) VALUES ('checked', ?)", (str(time.time()),))
        except sqlite3.Error as exc:
            self._conn.close()
            raise ConfigError(
                f"Cannot write the results store {self.path}: {exc}. Choose a writable path with --store."
            ) from None

    # ------------------------------------------------------------------------------------------------- set-up
    def _connect(self, target: str, *, uri: bool = False) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(target, uri=uri, timeout=60.0)
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as exc:
            raise ConfigError(f"Cannot open the results store {self.path}: {exc}.") from None
        conn.row_factory = sqlite3.Row
        return conn

    def _create(self) -> None:
        cols = ",\n  ".join(f"{c} {t}" for c, t in COLUMNS)
        with self._conn:
            self._conn.execute(f"CREATE TABLE IF NOT EXISTS results (\n  {cols}\n)")
            self._conn.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT)")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY AUTOINCREMENT, started REAL, command TEXT, "
                "config TEXT, model TEXT, version TEXT, threads INTEGER, cells INTEGER, todo INTEGER)"
            )
            self._conn.execute("INSERT OR IGNORE INTO meta(k, v) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        self._check_schema()

    def _check_schema(self) -> None:
        try:
            row = self._conn.execute("SELECT v FROM meta WHERE k = 'schema'").fetchone()
            have = {r[1] for r in self._conn.execute("PRAGMA table_info(results)")}
        except sqlite3.Error as exc:
            raise ConfigError(f"{self.path} is not a tokensieve results store: {exc}.") from None
        if row is None or int(row[0]) != SCHEMA_VERSION or set(COLUMN_NAMES) - have:
            raise ConfigError(
                f"{self.path} is not a tokensieve results store of schema {SCHEMA_VERSION}; use another --store path."
            )

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------ writing
    def start_run(self, *, command: str, config: Mapping[str, Any], model: str, version: str, threads: int,
                  cells: int, todo: int) -> int:  # fmt: skip
        with self._conn:
            cur = self._conn.execute(
                "INSERT INTO runs(started, command, config, model, version, threads, cells, todo) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), command, json.dumps(config, sort_keys=True), model, version, threads, cells, todo),
            )
        return int(cur.lastrowid or 0)

    def add(self, row: Mapping[str, Any]) -> None:
        """Insert one measured cell and commit. A key that is already stored is an error (never overwritten)."""
        unknown = set(row) - set(COLUMN_NAMES)
        if unknown:
            raise ValueError(f"unknown result columns: {sorted(unknown)}")
        cols = [c for c in COLUMN_NAMES if c in row]
        values = [_sql(row[c]) for c in cols]
        with self._conn:
            self._conn.execute(
                f"INSERT INTO results({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})", values
            )

    # ------------------------------------------------------------------------------------------------ reading
    def keys(self) -> set[str]:
        return {r[0] for r in self._conn.execute("SELECT key FROM results")}

    def count(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM results").fetchone()[0])

    def rows(self, where: str = "", params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        sql = "SELECT * FROM results" + (f" WHERE {where}" if where else "") + " ORDER BY created"
        return [dict(r) for r in self._conn.execute(sql, tuple(params))]

    def table_rows(self, table: str) -> list[dict[str, Any]]:
        """Every row of another table kept in this file (e.g. ``bench``), or [] if there is none."""
        if not table.isidentifier():
            raise ValueError(f"not a table name: {table!r}")
        try:
            return [dict(r) for r in self._conn.execute(f"SELECT * FROM {table} ORDER BY created")]
        except sqlite3.OperationalError:
            return []

    def runs(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._conn.execute("SELECT * FROM runs ORDER BY id")]

    def iter_rows(self) -> Iterator[dict[str, Any]]:
        with closing(self._conn.execute("SELECT * FROM results ORDER BY created")) as cur:
            for r in cur:
                yield dict(r)


def _sql(v: Any) -> Any:
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True, default=str)
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float) and v != v:  # NaN → NULL
        return None
    return v
