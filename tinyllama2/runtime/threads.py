"""Letting tinygrad run from more than one thread (one at a time: the engine's worker, and callers that take the
decoder's lock).

tinygrad 0.14 keeps one sqlite connection for its on-disk cache of compiled kernels, opened by whichever thread
compiled first; sqlite refuses a connection used from another thread unless it was opened to allow it. So the
connection is opened here with check_same_thread=False (the sqlite library serializes its use), with the settings
tinygrad's own `db_connection` gives it.

tinygrad 0.14 internals used: `helpers._db_connection`, `helpers.CACHEDB`, `helpers.CACHELEVEL`.
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
import threading

_lock = threading.Lock()


def share_compile_cache() -> None:
  """Make tinygrad's disk-cache connection usable from every thread (idempotent)."""
  from tinygrad import helpers
  with _lock:
    current = helpers._db_connection
    if getattr(current, "_tinyllama2_shared", False) or helpers.CACHELEVEL < 1: return
    os.makedirs(os.path.dirname(helpers.CACHEDB), exist_ok=True)
    conn = sqlite3.connect(helpers.CACHEDB, timeout=60, isolation_level="IMMEDIATE", check_same_thread=False,
                           factory=_SharedConnection)
    with contextlib.suppress(sqlite3.OperationalError): conn.execute("PRAGMA journal_mode=WAL").fetchone()
    conn.execute("PRAGMA synchronous=NORMAL")
    helpers._db_connection = conn
    if current is not None: current.close()


class _SharedConnection(sqlite3.Connection):
  _tinyllama2_shared = True
