"""Benchmark rows live in the evaluation's results store (same SQLite file), in a table of their own."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, fields
from typing import Any

from ..eval.store import ResultStore
from .runner import BenchRow

_SQL = {"int": "INTEGER", "float": "REAL"}


def _columns() -> list[tuple[str, str]]:
    return [(f.name, _SQL.get(str(f.type), "TEXT")) for f in fields(BenchRow)]


class BenchStore(ResultStore):
    """A results store that also holds benchmark rows (table ``bench``), one per measurement, each with the
    machine description, bandwidth, model and package version."""

    def _create(self) -> None:
        super()._create()
        cols = ", ".join(f"{c} {t}" for c, t in _columns())
        with self._conn:
            self._conn.execute(
                f"CREATE TABLE IF NOT EXISTS bench (key TEXT PRIMARY KEY, created REAL, model TEXT, version TEXT, "
                f"info TEXT, {cols})"
            )

    def has(self, key: str) -> bool:
        return self._conn.execute("SELECT 1 FROM bench WHERE key = ?", (key,)).fetchone() is not None

    def add_bench(self, key: str, row: BenchRow, info: dict[str, Any]) -> None:
        data = asdict(row)
        cols = ["key", "created", "model", "version", "info", *data]
        values = [key, time.time(), info.get("model", ""), info.get("version", ""), json.dumps(info), *data.values()]
        with self._conn:
            self._conn.execute(f"INSERT INTO bench({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})", values)

    def bench_rows(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Every benchmark row, and the info of the newest one (machine, bandwidth, weights)."""
        return read_bench_rows(self)


def read_bench_rows(store: ResultStore) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Benchmark rows of any results store (possibly none), and the info of the newest one."""
    rows = store.table_rows("bench")
    info = json.loads(rows[-1]["info"]) if rows else {}
    return rows, info
