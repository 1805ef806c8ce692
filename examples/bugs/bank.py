"""A bank with a bug: transfer() locks the two accounts in argument order.

Two transfers in opposite directions at the same moment each hold one account and wait for
the other: a deadlock that a plain test run almost never hits, and that hangs CI when it does.
"""

from __future__ import annotations

import threading


class Account:
    def __init__(self, name: str, balance: int) -> None:
        self.name = name
        self.balance = balance
        self.lock = threading.Lock()


def transfer(source: Account, target: Account, amount: int) -> None:
    with source.lock:  # BUG: lock order depends on the direction of the transfer
        with target.lock:
            source.balance -= amount
            target.balance += amount


class AuditLog:
    """Writes entries in a background thread; close() forgets to stop and join it."""

    def __init__(self) -> None:
        self.entries: list[str] = []
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._flush, name="audit-flusher", daemon=True)
        self._worker.start()

    def _flush(self) -> None:
        while not self._stop.wait(0.01):
            pass

    def close(self) -> None:
        pass  # BUG: should set self._stop and join self._worker
