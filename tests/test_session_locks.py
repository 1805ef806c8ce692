"""Locks made anywhere in the session are tracked: fixtures, imports, conftest.py, libraries.

Each inner run that can deadlock runs in a subprocess with a deadline far above what a
diagnosis takes (``--concur-timeout=30``), so a failure that says ``DeadlockError`` was
found by the tracker, not by the deadline; pytest-timeout is the safety net of the suite.
"""

from __future__ import annotations

import pytest
from _helpers import NO_RANDOMLY, runner

run = runner("--timeout=60", *NO_RANDOMLY, "--concur-timeout=30", timeout=120)


# Two tests on a pair of locks: two threads that take them in opposite orders (a deadlock),
# and one thread that nests them both ways in turn (an inversion, with no hang).
TESTS = """
import threading
import pytest

@pytest.mark.backend("thread")
def test_deadlock({arg}):
    a, b = {pair}
    both = threading.Barrier(2)

    def one():
        with a:
            both.wait()
            with b:
                pass

    def two():
        with b:
            both.wait()
            with a:
                pass

    threads = [threading.Thread(target=f, name=f.__name__) for f in (one, two)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

@pytest.mark.backend("thread")
def test_inversion({arg}):
    a, b = {pair}
    with a:
        with b:
            pass
    with b:
        with a:
            pass
"""

# Where the locks are made: (files to write, the test's argument, how it gets the pair,
# the file and function (fnmatch) the report must name as where each lock was made).
PLACES = {
    "function fixture": (
        {
            "conftest": """
                import threading, pytest

                @pytest.fixture
                def pair():
                    first = threading.Lock()
                    second = threading.Lock()
                    return first, second
            """
        },
        "pair",
        "pair",
        ("conftest.py:5 in pair", "conftest.py:6 in pair"),
    ),
    "module fixture": (
        {
            "conftest": """
                import threading, pytest

                @pytest.fixture(scope="module")
                def pair():
                    first = threading.RLock()
                    second = threading.RLock()
                    return first, second
            """
        },
        "pair",
        "pair",
        ("conftest.py:5 in pair", "conftest.py:6 in pair"),
    ),
    "session fixture": (
        {
            "conftest": """
                import threading, pytest

                class Pair:
                    def __init__(self):
                        self.first = threading.Lock()
                        self.second = threading.Lock()

                @pytest.fixture(scope="session")
                def pair():
                    made = Pair()
                    return made.first, made.second
            """
        },
        "pair",
        "pair",
        (
            "conftest.py:5 in __init__ (from conftest.py:10)",
            "conftest.py:6 in __init__ (from conftest.py:10)",
        ),
    ),
    "conftest import": (
        {
            "conftest": """
                import threading

                FIRST = threading.Lock()
                SECOND = threading.Lock()
            """
        },
        "",
        "__import__('conftest').FIRST, __import__('conftest').SECOND",
        ("conftest.py:3 in <module>", "conftest.py:4 in <module>"),
    ),
    "helper module import": (
        {
            "helper": """
                import threading

                FIRST = threading.Lock()
                SECOND = threading.Lock()
            """
        },
        "",
        "__import__('helper').FIRST, __import__('helper').SECOND",
        ("helper.py:3 in <module>", "helper.py:4 in <module>"),
    ),
}


@pytest.mark.parametrize("place", PLACES)
def test_locks_made_outside_the_body_deadlock_and_invert_with_a_diagnosis(
    pytester: pytest.Pytester, place: str
) -> None:
    files, arg, pair, sites = PLACES[place]
    for name, source in files.items():
        pytester.makepyfile(**{name: source})
    pytester.makepyfile(test_place=TESTS.format(arg=arg, pair=pair))
    result = run(pytester)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*DeadlockError: pytest-concur: deadlock: a wait-for cycle*",
            f"*thread 'one' waits for *Lock created at {sites[1]}, held by 'two'",
            f"*thread 'two' waits for *Lock created at {sites[0]}, held by 'one'",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*pytest-concur: potential deadlock: two locks are taken in both orders",
            f"*Lock A created at {sites[0]}",
            f"*Lock B created at {sites[1]}",
        ]
    )
    result.stdout.no_fnmatch_line("*Timeout*")


def test_check_all_finds_the_deadlock_on_fixture_locks_in_a_plain_test(
    pytester: pytest.Pytester,
) -> None:
    files, arg, pair, sites = PLACES["function fixture"]
    pytester.makepyfile(**files)
    pytester.makepyfile(
        test_place=TESTS.format(arg=arg, pair=pair).replace('@pytest.mark.backend("thread")', "")
    )
    result = run(pytester, "--concur-check-all")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*DeadlockError: pytest-concur: deadlock: a wait-for cycle*",
            f"*thread 'one' waits for Lock created at {sites[1]}, held by 'two'",
        ]
    )
    result.stdout.fnmatch_lines(["*potential deadlock: two locks are taken in both orders"])
    result.stdout.no_fnmatch_line("*Timeout*")


def test_lock_made_at_test_module_import_deadlocks_with_a_diagnosis(
    pytester: pytest.Pytester,
) -> None:
    source = TESTS.format(arg="", pair="A, B")
    pytester.makepyfile(
        test_module="import threading\nA, B = threading.Lock(), threading.Lock()\n" + source
    )
    result = run(pytester)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*DeadlockError: pytest-concur: deadlock: a wait-for cycle*",
            "*thread 'one' waits for Lock created at test_module.py:2 in <module>, held by 'two'",
            "*potential deadlock: two locks are taken in both orders",
        ]
    )
    result.stdout.no_fnmatch_line("*Timeout*")


def test_thread_a_fixture_started_is_part_of_the_cycle(pytester: pytest.Pytester) -> None:
    # The fixture's thread takes its lock before the body begins, then waits for the
    # body's lock: the body, waiting for the fixture's lock, closes the cycle.
    pytester.makepyfile(
        """
        import threading
        import pytest

        @pytest.fixture
        def worker():
            mine, theirs = threading.Lock(), threading.Lock()
            go, holding = threading.Event(), threading.Event()

            def work():
                with mine:
                    holding.set()
                    go.wait()
                    with theirs:
                        pass

            thread = threading.Thread(target=work, name="fixture-worker", daemon=True)
            thread.start()
            holding.wait()
            yield mine, theirs, go
            thread.join(5)

        @pytest.mark.backend("thread")
        def test_body(worker):
            mine, theirs, go = worker
            with theirs:
                go.set()
                with mine:
                    pass
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*DeadlockError: pytest-concur: deadlock: a wait-for cycle*",
            "*waits for Lock created at test_thread_a_fixture_started*.py:6 in worker, "
            "held by 'fixture-worker'",
        ]
    )


def test_hang_report_names_the_holder_of_a_lock_taken_before_the_test(
    pytester: pytest.Pytester,
) -> None:
    # The holder waits with a timeout (it could wake): no deadlock, a hang; the report names who holds
    # the lock the body waits for, though it took the lock during the fixture's setup.
    pytester.makepyfile(
        """
        import threading
        import pytest

        @pytest.fixture
        def held():
            lock, holding, done = threading.Lock(), threading.Event(), threading.Event()

            def hold():
                with lock:
                    holding.set()
                    done.wait(60)  # a timed wait: it may end, so nobody is deadlocked

            holder = threading.Thread(target=hold, name="holder")
            holder.start()
            holding.wait()
            yield lock
            done.set()
            holder.join()

        @pytest.mark.backend("thread")
        def test_waits(held):
            with held:
                pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly", "--concur-timeout=2", timeout=120)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*Timeout (>2s*",
            "*waits for Lock created at test_hang_report*.py:6 in held, held by 'holder'*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*Thread 'holder' (running before the test began)*",
            "*holds Lock created at test_hang_report*.py:6 in held",
        ]
    )


def test_correct_code_on_locks_made_outside_the_body_stays_green(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import concurrent.futures, logging, queue, threading
        import pytest

        LOG = logging.getLogger("app")
        LOG.addHandler(logging.StreamHandler())  # its lock is made here: tracked

        @pytest.fixture(scope="session")
        def pool():
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                yield pool

        @pytest.fixture
        def box():
            return queue.Queue(), threading.Condition(threading.RLock()), [threading.Lock()]
        """
    )
    pytester.makepyfile(
        """
        import threading
        import pytest
        from conftest import LOG

        ORDER = threading.Lock(), threading.Lock()

        def nested():
            with ORDER[0]:
                with ORDER[1]:
                    LOG.warning("nested")

        def test_plain_inversion_is_not_watched():
            with ORDER[1]:
                with ORDER[0]:
                    pass

        # (Not under process: the session's pool threads make it forkserver, and a queue
        # does not pickle.)
        @pytest.mark.backend("thread", "asyncio")
        def test_producer_consumer(box, pool):
            jobs, cond, (guard,) = box
            done = []

            def consume():
                while (job := jobs.get()) is not None:
                    with cond:
                        done.append(job)
                        cond.notify_all()

            consumer = threading.Thread(target=consume)
            consumer.start()
            for job in range(50):
                jobs.put(job)
            with cond:
                assert cond.wait_for(lambda: len(done) == 50, timeout=10)
            jobs.put(None)
            consumer.join()
            assert [f.result() for f in [pool.submit(nested) for _ in range(4)]] == [None] * 4
            assert guard.acquire(timeout=0.01) and not guard.acquire(False)
            guard.release()
        """
    )
    for args in ((), ("--concur-check-all",)):
        result = run(pytester, *args)
        result.assert_outcomes(passed=3)


def test_disabled_plugin_installs_nothing(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import _thread, sys, threading

        def test_plain_locks():
            assert threading.Lock.__module__ == "_thread"  # a function before 3.13, a class since
            assert type(threading.Lock()) is _thread.LockType
            assert type(threading.RLock()).__module__ == "_thread"
            assert "pytest_concur._locks" not in sys.modules
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:concur", timeout=120)
    result.assert_outcomes(passed=1)


def test_fork_under_the_process_backend_with_locks_a_fixture_made(
    pytester: pytest.Pytester,
) -> None:
    # logging's at-fork hook re-creates a handler's lock in the child with _at_fork_reinit:
    # a tracked lock held by another thread at the fork is free again in the child.
    pytester.makepyfile(
        """
        import logging, os, threading
        import pytest
        from pytest_concur import _locks

        @pytest.fixture
        def made():
            return logging.StreamHandler(), threading.Condition(threading.Lock())

        @pytest.mark.backend("process")
        def test_fork(made):
            handler, cond = made
            assert isinstance(handler.lock, _locks.TrackedLock)
            held, done = threading.Event(), threading.Event()

            def hold():
                with handler.lock:
                    held.set()
                    done.wait(30)

            holder = threading.Thread(target=hold)
            holder.start()
            held.wait()
            pid = os.fork()
            if pid == 0:
                ok = handler.lock.acquire(timeout=5)
                os._exit(0 if ok else 1)
            done.set()
            holder.join()
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            with cond:
                assert not cond.wait(0.01)

        def test_threading_remakes_its_own_locks_plain_in_a_forked_child():
            pid = os.fork()
            if pid == 0:
                plain = not isinstance(threading._active_limbo_lock, _locks.TrackedLock)
                worker = threading.Thread(target=lambda: None)
                worker.start()
                worker.join()
                os._exit(0 if plain else 1)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
        """
    )
    result = run(pytester, "--concur-start-method=fork")
    result.assert_outcomes(passed=2)


def test_session_locks_off_tracks_only_the_locks_a_body_makes(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nconcur_session_locks = false\n")
    pytester.makepyfile(
        """
        import _thread, threading
        import pytest
        from pytest_concur import _locks

        AT_IMPORT = threading.Lock()

        @pytest.fixture
        def made():
            return threading.Lock()

        @pytest.mark.backend("thread")
        def test_body(made):
            assert type(AT_IMPORT) is type(made) is _thread.LockType
            assert type(threading.Lock()) is _locks.TrackedLock

        def test_plain():
            assert threading.Lock.__module__ == "_thread"  # a function before 3.13, a class since
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=2)


LOCK_KINDS = """
import _thread, threading
import pytest

def test_plain():
    assert (type(threading.Lock()) is _thread.LockType) == {plain_lock}
"""


@pytest.mark.parametrize(
    ("extra", "plain_lock"),
    [
        ("", True),  # no item runs under a backend: locks made from here on are plain
        ("@pytest.mark.backend('thread')\ndef test_under_a_backend():\n    pass\n", False),
    ],
    ids=["no-backend-item", "a-backend-item"],
)
def test_a_session_without_backend_items_stops_tracking_after_collection(
    pytester: pytest.Pytester, extra: str, plain_lock: bool
) -> None:
    # What a plain suite pays for the plugin being installed: nothing per lock it makes in
    # its tests, once collection has shown that no body runs under a backend.
    pytester.makepyfile(LOCK_KINDS.format(plain_lock=plain_lock) + extra)
    result = pytester.runpytest_subprocess(*NO_RANDOMLY, timeout=120)
    result.assert_outcomes(passed=2 if extra else 1)


def test_the_plugins_own_bookkeeping_makes_no_tracked_lock(pytester: pytest.Pytester) -> None:
    # The checks' recordings, the body's thread and its Event, pytest's log handlers: made
    # after the factories were replaced, they must still be real locks, or reports would
    # count them as the test's (and every item would pay for tracking them).
    pytester.makeconftest(
        """
        import os
        import sys
        import pytest
        import pytest_concur
        from pytest_concur._locks import TrackedLock

        PACKAGE = os.path.dirname(pytest_concur.__file__)
        MADE = []
        _init = TrackedLock.__init__

        def init(self, *args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.endswith(
                ("threading.py", os.path.join("logging", "__init__.py"), "_locks.py")
            ):
                frame = frame.f_back
            if frame is not None:
                MADE.append(f"{frame.f_code.co_filename}:{frame.f_lineno}")
            _init(self, *args, **kwargs)

        TrackedLock.__init__ = init

        @pytest.hookimpl(wrapper=True)
        def pytest_runtest_protocol(item):
            MADE.clear()
            try:
                return (yield)
            finally:
                ours = [site for site in MADE if site.startswith(PACKAGE)]
                print(f"made by pytest-concur for {item.name}: {ours}")
        """
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.backend("thread", "asyncio")
        @pytest.mark.parametrize("n", range(2))
        def test_makes_no_lock(n):
            pass
        """
    )
    result = run(pytester, "-s")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*made by pytest-concur for test_makes_no_lock*: [[][]]"] * 4)
    result.stdout.no_fnmatch_line("*made by pytest-concur for *: [[]'*")
