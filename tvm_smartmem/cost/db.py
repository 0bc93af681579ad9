"""The profile database: measured latencies of fusion candidates (fused block vs. its parts)
and of schedule-knob candidates.

One sqlite file.  Table ``entries``: one row per (candidate key, target kind), written by
``tvm-smartmem tune`` and read by the fusion planner; keys are the JSON descriptions of
:mod:`.features`.  Table ``schedule_knobs``: one row per (target, device, models, knobs),
written by ``tvm-smartmem tune-schedules`` (:mod:`tvm_smartmem.tir.knob_search`), which reads
it back instead of measuring a candidate twice.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sqlite3
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id TEXT NOT NULL,
    target TEXT NOT NULL,
    key TEXT NOT NULL,
    fused_ms REAL NOT NULL,
    parts_ms REAL NOT NULL,
    device TEXT,
    created TEXT,
    PRIMARY KEY (id, target)
)
"""


_KNOBS_SCHEMA = """
CREATE TABLE IF NOT EXISTS schedule_knobs (
    target TEXT NOT NULL,
    device TEXT NOT NULL,
    models TEXT NOT NULL,
    knobs TEXT NOT NULL,
    ms REAL NOT NULL,
    created TEXT,
    PRIMARY KEY (target, device, models, knobs)
)
"""


#: ``TVM_SMARTMEM_PROFILE_DB`` names the database the pipeline consults (``none`` switches it
#: off); by default it is ``<cache>/profile.sqlite`` once ``tvm-smartmem tune`` has written it.
ENV = "TVM_SMARTMEM_PROFILE_DB"


def default_path() -> Path:
    """Where ``tvm-smartmem tune`` writes and the pipeline reads, unless told otherwise."""
    env = os.environ.get(ENV, "")
    if env and env.lower() not in ("none", "off", "0"):
        return Path(env)
    from ..runtime.opencl import cache_dir

    return cache_dir() / "profile.sqlite"


def pipeline_db() -> Path | None:
    """The database the smartmem pipeline consults: the default one if it exists."""
    if os.environ.get(ENV, "").lower() in ("none", "off", "0"):
        return None
    path = default_path()
    return path if path.exists() else None


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    target: str
    key: dict
    fused_ms: float
    parts_ms: float
    device: str

    @property
    def gain(self) -> float:
        """Relative time saved by fusing (positive: fusing is faster)."""
        return (self.parts_ms - self.fused_ms) / self.parts_ms if self.parts_ms else 0.0


class ProfileDB:
    """A persistent table of measurements; safe to open from several processes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self.path), timeout=30)
        self._conn.execute(_SCHEMA)
        self._conn.execute(_KNOBS_SCHEMA)
        self._conn.commit()

    def record(self, key: dict, fused_ms: float, parts_ms: float, device: str = "") -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key["id"], key["target"], json.dumps(key, sort_keys=True), float(fused_ms),
             float(parts_ms), device,
             datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")),
        )
        self._conn.commit()

    def lookup(self, key: dict) -> Row | None:
        cur = self._conn.execute(
            "SELECT id, target, key, fused_ms, parts_ms, device FROM entries "
            "WHERE id = ? AND target = ?", (key["id"], key["target"]),
        )
        r = cur.fetchone()
        return _row(r) if r else None

    def rows(self, target: str | None = None) -> list[Row]:
        sql = "SELECT id, target, key, fused_ms, parts_ms, device FROM entries"
        args: tuple = ()
        if target:
            sql += " WHERE target = ?"
            args = (target,)
        return [_row(r) for r in self._conn.execute(sql, args).fetchall()]

    def record_knobs(self, target: str, device: str, models: str, knobs: dict,
                     ms: float) -> None:
        """A schedule-knob candidate's score (``inf``: it failed) on ``device``."""
        self._conn.execute(
            "INSERT OR REPLACE INTO schedule_knobs VALUES (?, ?, ?, ?, ?, ?)",
            (target, device, models, json.dumps(knobs, sort_keys=True),
             ms if ms != float("inf") else 1e300,
             datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")))
        self._conn.commit()

    def lookup_knobs(self, target: str, device: str, models: str, knobs: dict) -> float | None:
        r = self._conn.execute(
            "SELECT ms FROM schedule_knobs WHERE target = ? AND device = ? AND models = ? "
            "AND knobs = ?", (target, device, models, json.dumps(knobs, sort_keys=True)),
        ).fetchone()
        if r is None:
            return None
        return float("inf") if r[0] >= 1e300 else float(r[0])

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def close(self) -> None:
        self._conn.close()


def _row(r) -> Row:
    return Row(r[0], r[1], json.loads(r[2]), r[3], r[4], r[5] or "")
