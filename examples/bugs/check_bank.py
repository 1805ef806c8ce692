"""pytest-concur finding the bugs in bank.py. Run: pytest examples/bugs/check_bank.py

Both tests fail, on purpose, with pytest-concur's diagnosis:

- test_transfers_both_ways: the two accounts' locks are taken in both orders. No deadlock
  happened in this run, and the test still fails as a *potential* deadlock naming both places.
- test_transfers_at_once: the same bug, provoked: two threads meet in the middle (a barrier)
  and deadlock; the test fails in milliseconds with who holds what and who waits for what.
- test_audit_log_closes: close() leaves the flusher thread running; the leak check names it
  and where it was started.
"""

from __future__ import annotations

import threading

import pytest
from bank import Account, AuditLog, transfer

pytestmark = pytest.mark.backend("thread")


def test_transfers_both_ways() -> None:
    alice, bob = Account("alice", 100), Account("bob", 100)
    transfer(alice, bob, 10)
    transfer(bob, alice, 5)
    assert (alice.balance, bob.balance) == (95, 105)


def test_transfers_at_once() -> None:
    alice, bob = Account("alice", 100), Account("bob", 100)
    meet = threading.Barrier(2)

    def pay(source: Account, target: Account) -> None:
        with source.lock:
            meet.wait()  # both hold their first lock now
            with target.lock:
                source.balance -= 1

    workers = [
        threading.Thread(target=pay, args=(alice, bob), name="alice-pays-bob"),
        threading.Thread(target=pay, args=(bob, alice), name="bob-pays-alice"),
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def test_audit_log_closes() -> None:
    log = AuditLog()
    log.close()
