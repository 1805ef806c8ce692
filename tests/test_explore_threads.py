"""Exploring thread bodies: races between threads found on purpose, replayed exactly."""

from __future__ import annotations

import re

import pytest

TOKEN = re.compile(r"--concur-replay=([rpb]1-[0-9a-fn.+]+-[0-9a-f]{4})")

# The read-modify-write race: each thread reads, then writes what it read plus one. The
# operating system's scheduler almost never switches between the two lines.
LOST_UPDATE = """
import threading
import pytest

class Counter:
    def __init__(self):
        self.n = 0

    def add(self):
        v = self.n
        self.n = v + 1

RUNS = []

@pytest.mark.backend("thread"{explore})
def test_counts_every_add():
    RUNS.append(1)
    counter = Counter()
    lock = threading.Lock()
    counter.lock = lock
    threads = [threading.Thread(target=counter.add) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counter.n == 2, "an update was lost"

def test_zz_runs():
    print("RUNS", len(RUNS))
"""

INI = "[pytest]\nconcur_blocked_loop = 5\n"


@pytest.fixture(autouse=True)
def _generous_blocked_loop(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)


def lost_update(*, locked: bool = False, explore: int | None = None) -> str:
    body = LOST_UPDATE.format(explore="" if explore is None else f", explore={explore}")
    if locked:
        body = body.replace(
            "        v = self.n\n        self.n = v + 1",
            "        with self.lock:\n            v = self.n\n            self.n = v + 1",
        )
    return body


def test_the_lost_update_is_found_and_its_token_replays_it(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(lost_update())
    result = pytester.runpytest("--concur-explore=100", "--concur-seed=1", "-p", "no:randomly")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*AssertionError: an update was lost",
            "*- pytest-concur: schedule -*",
            # A small body: the bounded search finds it (see the test below).
            "schedule * of 100 failed: b1-* (listed, * scheduling decisions)",
            "Rerun exactly this interleaving with:",
            "*--concur-replay=b1-*",
            "The interleaving, switch by switch *",
            # The one preemption: between the read and the write of the other thread.
            "*thread 'Thread-* (add)' (Counter.add) ran (of 2 ready), preempting thread "
            "'Thread-* (add)' (Counter.add) at test_the_lost_update*.py:10",
        ]
    )
    token = TOKEN.search(result.stdout.str())
    assert token is not None
    count = re.search(r"\b(\d+) scheduling decisions\)\nRerun", result.stdout.str())
    assert count is not None
    for _ in range(5):
        replay = pytester.runpytest(f"--concur-replay={token[1]}", "-p", "no:randomly")
        replay.assert_outcomes(failed=1, passed=1)
        replay.stdout.fnmatch_lines(
            [
                "*AssertionError: an update was lost",
                f"replay of {token[1]} failed again, after the same {count[1]} scheduling "
                "decisions as the recorded run",
            ]
        )


def test_the_bounded_search_finds_the_lost_update_first_whatever_the_seed(
    pytester: pytest.Pytester,
) -> None:
    # The default order, then each single switch from it in order: the seed plays no part.
    pytester.makepyfile(lost_update())
    tokens, numbers = set(), set()
    for seed in (1, 2, 3):
        result = pytester.runpytest("--concur-explore=100", f"--concur-seed={seed}")
        result.assert_outcomes(failed=1, passed=1)
        found = re.search(r"schedule (\d+) of 100 failed: (b1-\S+) \(listed", result.stdout.str())
        assert found is not None
        numbers.add(int(found[1]))
        tokens.add(found[2])
    assert len(tokens) == 1
    assert len(numbers) == 1
    assert numbers.pop() <= 20


# A body too large for the bounded search (its default order makes more than 40
# decisions): random and PCT find the race, with switches that have nothing to do with it.
LARGE = lost_update().replace(
    "    def add(self):\n", "    def add(self):\n        for _ in range(25):\n            pass\n"
)


def test_a_failing_schedule_is_shrunk_and_the_shrunk_token_replays_20_of_20(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(LARGE)
    # Only the budget of runs, not of seconds, on a loaded machine: the same result each time.
    pytester.makeconftest("from pytest_concur._explore import _run\n_run.SHRINK_SECONDS = 60\n")
    result = pytester.runpytest("--concur-explore=100", "--concur-seed=1")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*AssertionError: an update was lost",
            "*- pytest-concur: schedule -*",
            "schedule * of 100 failed: [rp]1-* (*, * scheduling decisions)",
            "Shrunk from * preemptions to * in * more runs: b1-* (* scheduling decisions)",
            "Rerun exactly this interleaving with:",
            "*--concur-replay=b1-*",
            "The interleaving, switch by switch *",
            "*thread 'Thread-* (add)' (Counter.add) ran * preempting thread "
            "'Thread-* (add)' (Counter.add) at test_a_failing*.py:*",
        ]
    )
    shrunk = re.search(r"Shrunk from (\d+) preemptions to (\d+) in (\d+) more", result.stdout.str())
    assert shrunk is not None
    before, after, runs = map(int, shrunk.groups())
    assert after < before
    # Switches keyed by where each thread stands: dropping one does not move the others,
    # so most of the noise goes (53 preemptions to 3 with this seed).
    assert after <= 3
    assert runs <= 50
    token = TOKEN.search(result.stdout.str())
    assert token is not None
    assert token[1].startswith("b1-")
    count = re.search(r"\b(\d+) scheduling decisions\)\nRerun", result.stdout.str())
    assert count is not None
    replayed = partly = 0
    while replayed < 20:
        replay = pytester.runpytest(f"--concur-replay={token[1]}")
        if "passed, but it was partly controlled" in replay.stdout.str() and partly < 3:
            # A thread that a loaded machine did not run for 50 ms lost its turn, and the run
            # says that its pass tells nothing about the interleaving: not a replay of it.
            partly += 1
            continue
        replayed += 1
        replay.assert_outcomes(failed=1, passed=1)
        replay.stdout.fnmatch_lines(
            [
                "*AssertionError: an update was lost",
                f"replay of {token[1]} failed again, after the same {count[1]} scheduling "
                "decisions as the recorded run",
            ]
        )


def test_shrinking_that_finds_nothing_says_so_within_its_budget(
    pytester: pytest.Pytester,
) -> None:
    # Only the first random schedule fails (run 2; run 1 is the default order): no shrunk
    # schedule can fail the same way, and shrinking stops at its budget of runs.
    pytester.makepyfile(
        LARGE.replace(
            'assert counter.n == 2, "an update was lost"', 'assert len(RUNS) != 2, "once"'
        )
    )
    result = pytester.runpytest("--concur-explore=100", "-s")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*AssertionError: once",
            "schedule 2 of 100 failed: r1-* (random, * scheduling decisions)",
            "Not shrunk: no schedule with fewer preemptions failed the same way in * more "
            "runs (* preemptions)",
            "Rerun exactly this interleaving with:",
            "*--concur-replay=r1-*",
        ]
    )
    runs = re.search(r"RUNS (\d+)", result.stdout.str())
    assert runs is not None
    assert 2 < int(runs[1]) <= 2 + 50


def test_a_thread_replay_that_diverges_counts_threads(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(lost_update(explore=100))
    pytester.runpytest().assert_outcomes(failed=1, passed=1)
    # Three threads now: the recorded decisions no longer match.
    pytester.makepyfile(lost_update(explore=100).replace("range(2)", "range(3)"))
    result = pytester.runpytest("--concur-replay=last")
    result.stdout.fnmatch_lines(
        [
            "*diverged from the recorded run at scheduling decision *: * threads were ready where "
            "the recorded run had *"
        ]
    )
    assert "tasks were ready" not in result.stdout.str()


def test_a_plain_run_passes_the_lost_update(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(lost_update())
    pytester.runpytest("-p", "no:randomly").assert_outcomes(passed=2)


def test_the_locked_update_passes_every_schedule(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(lost_update(locked=True, explore=100))
    result = pytester.runpytest("-p", "no:randomly", "-s")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*RUNS 100*"])


def test_check_then_act_on_a_dict_is_found(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import threading
        import pytest

        MADE = []

        def get(cache, key):
            if key not in cache:
                MADE.append(key)
                cache[key] = object()
            return cache[key]

        @pytest.mark.backend("thread", explore=100)
        def test_made_once():
            MADE.clear()
            cache = {}
            threads = [threading.Thread(target=get, args=(cache, "k")) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert MADE == ["k"], "made twice"
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*AssertionError: made twice", "schedule * of 100 failed: *"])


def test_an_abba_deadlock_is_found_as_a_deadlock(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import threading
        import pytest

        @pytest.mark.backend("thread", explore=100)
        def test_transfer():
            a, b = threading.Lock(), threading.Lock()

            def one():
                with a:
                    with b:
                        pass

            def other():
                with b:
                    with a:
                        pass

            threads = [threading.Thread(target=one), threading.Thread(target=other)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        """
    )
    # The deadlock itself is the finding, not the lock order it also shows.
    pytester.makeini(INI + "concur_lock_order = off\n")
    result = pytester.runpytest_subprocess("--concur-timeout=20")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*deadlock: a wait-for cycle*", "*: DeadlockError", "schedule * of 100 failed: *"]
    )


def test_a_thread_blocked_where_nothing_sees_does_not_hang(pytester: pytest.Pytester) -> None:
    # time.sleep and a socket's recv are no switch points: the scheduler lets go of the
    # sleeper after a short while, and says the run was partly controlled.
    pytester.makepyfile(
        """
        import socket
        import threading
        import time
        import pytest

        @pytest.mark.backend("thread", explore=5)
        def test_sleeps_and_waits():
            left, right = socket.socketpair()
            got = []

            def receive():
                got.append(left.recv(1))

            def send():
                time.sleep(0.1)
                right.sendall(b"x")

            threads = [threading.Thread(target=receive), threading.Thread(target=send)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            left.close()
            right.close()
            assert got == [b"x"]
        """
    )
    result = pytester.runpytest_subprocess("--concur-timeout=30")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["pytest-concur: *test_sleeps_and_waits[[]thread[]]: partly controlled in * of the *"]
    )


def test_condition_and_event_waits_are_switch_points(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import queue
        import threading
        import pytest

        @pytest.mark.backend("thread", explore=50)
        def test_hand_over():
            ready = threading.Event()
            items = queue.Queue()

            def produce():
                ready.wait()
                for n in range(3):
                    items.put(n)

            thread = threading.Thread(target=produce)
            thread.start()
            ready.set()
            assert [items.get() for _ in range(3)] == [0, 1, 2]
            thread.join()
        """
    )
    result = pytester.runpytest_subprocess("--concur-timeout=30")
    result.assert_outcomes(passed=1)
    # Were these waits unseen, every run would lose control at them (a loaded machine may
    # make one run do so anyway: a holder starved for the stall timeout).
    assert "partly controlled in 50 of" not in result.stdout.str()
    assert "ran once" not in result.stdout.str()


def test_stress_copies_are_scheduled_together(pytester: pytest.Pytester) -> None:
    # Both copies' lines interleave in some runs, which a plain run of two copies this
    # short almost never shows.
    pytester.makepyfile(
        """
        import pytest

        SEEN = []

        @pytest.mark.backend("thread", workers=2, explore=30)
        def test_copies(worker_index):
            SEEN.append(worker_index)
            SEEN.append(worker_index)

        def test_zz_orders():
            runs = {tuple(SEEN[i : i + 4]) for i in range(0, len(SEEN), 4)}
            assert len(SEEN) == 120
            assert runs - {(0, 0, 1, 1), (1, 1, 0, 0)}, runs
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly", "--concur-timeout=30")
    result.assert_outcomes(passed=2)
