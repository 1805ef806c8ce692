"""Schedule exploration (explore=N, --concur-explore): races found on purpose, replayed exactly."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

# A check-then-await race: two tasks want the same key; the second must find the first's
# value. asyncio's own first-in-first-out order lets ``get`` finish before ``later`` looks,
# so a plain run passes; an order where ``later`` looks while ``get`` awaits fetches twice.
RACE = """
import asyncio
import pytest

FETCHES = []

async def fetch(key):
    FETCHES.append(key)
    await asyncio.sleep(0)
    return key * 2

async def get(cache, key):
    if key not in cache:
        cache[key] = await fetch(key)
    return cache[key]

async def later(cache, key):
    await asyncio.sleep(0)
    return await get(cache, key)

@pytest.mark.backend({backends}{explore})
async def test_fetched_once():
    FETCHES.clear()
    cache = {{}}
    assert await asyncio.gather(get(cache, 1), later(cache, 1)) == [2, 2]
    assert FETCHES == [1], "fetched more than once"
"""

TOKEN = re.compile(r"--concur-replay=([rpb]1-[0-9a-fn.+]+-[0-9a-f]{4})")


# Every run of an explored body is checked, the blocked-loop check too, with its 0.1 s
# default: on a loaded machine a trivial step can take that long. These tests are about
# schedules, not blocking; a generous threshold keeps them about that.
INI = "[pytest]\nconcur_blocked_loop = 5\n"


@pytest.fixture(autouse=True)
def _generous_blocked_loop(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)


def race(backends: str = '"asyncio"', explore: int | None = 50) -> str:
    return RACE.format(backends=backends, explore="" if explore is None else f", explore={explore}")


def test_a_plain_run_passes_the_race(pytester: pytest.Pytester) -> None:
    # What makes exploring worth it: asyncio's own order hides this race.
    pytester.makepyfile(race('"asyncio", "thread"', explore=None))
    pytester.runpytest().assert_outcomes(passed=2)


@pytest.mark.parametrize("backend", ["asyncio", "thread"])
def test_check_then_await_race_is_found_and_replays_exactly(
    pytester: pytest.Pytester, backend: str
) -> None:
    pytester.makepyfile(race(f'"{backend}"'))
    result = pytester.runpytest("--concur-seed=1")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*AssertionError: fetched more than once",
            "*- pytest-concur: schedule -*",
            "schedule * of 50 failed: r1-* (random, * scheduling decisions)",
            "Shrunk from * preemptions to 1 in * more runs: b1-* (* scheduling decisions)",
            "Rerun exactly this interleaving with:",
            f"  pytest 'test_check_then_await_race_is_found_and_replays_exactly.py::"
            f"test_fetched_once[[]{backend}[]]' --concur-replay=b1-*",
            "The interleaving, switch by switch *",
            "*task * (later) ran from test_check_then_await_race_is_found_and_replays_exactly.py:"
            "* (of 2 ready), preempting task * (get) at *.py:13",
        ]
    )
    token = TOKEN.search(result.stdout.str())
    assert token is not None
    decisions = re.search(r"\((\d+ scheduling decisions)\)\nRerun", result.stdout.str())
    assert decisions is not None
    count = decisions[1]
    # The shrunk schedule is the one printed: its replay fails the same way, every time.
    for _ in range(20):
        replay = pytester.runpytest(f"--concur-replay={token[1]}")
        replay.assert_outcomes(failed=1)
        replay.stdout.fnmatch_lines(
            [
                "*AssertionError: fetched more than once",
                f"replay of {token[1]} failed again, after the same {count} as the recorded run",
            ]
        )


def test_the_locked_version_passes_200_schedules(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import asyncio
        import pytest

        FETCHES = []
        RUNS = []

        async def fetch(key):
            FETCHES.append(key)
            await asyncio.sleep(0)
            return key * 2

        async def get(lock, cache, key):
            async with lock:
                if key not in cache:
                    cache[key] = await fetch(key)
            return cache[key]

        async def later(lock, cache, key):
            await asyncio.sleep(0)
            return await get(lock, cache, key)

        @pytest.mark.backend("asyncio", "thread", explore=200)
        async def test_fetched_once():
            RUNS.append(1)
            FETCHES.clear()
            lock, cache = asyncio.Lock(), {}
            assert await asyncio.gather(get(lock, cache, 1), later(lock, cache, 1)) == [2, 2]
            assert FETCHES == [1], "fetched more than once"

        def test_zz_every_schedule_ran():
            assert len(RUNS) == 2 * 200
        """
    )
    pytester.runpytest("-p", "no:randomly").assert_outcomes(passed=3)


def test_same_seed_same_schedules_and_the_seed_is_in_the_header(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(race())
    first = pytester.runpytest("--concur-seed=7")
    first.stdout.fnmatch_lines(
        ["pytest-concur: explore seed 7 (--concur-seed=7 tries the same schedules again)"]
    )
    again = pytester.runpytest("--concur-seed=7")
    assert TOKEN.findall(first.stdout.str()) == TOKEN.findall(again.stdout.str())
    assert TOKEN.findall(first.stdout.str())


def test_a_random_seed_is_named_at_the_end(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(race())
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    seed = re.search(
        r"explored 1 test\(s\) from seed (\d+) \(--concur-seed=(\d+)", result.stdout.str()
    )
    assert seed is not None
    assert seed[1] == seed[2]
    again = pytester.runpytest(f"--concur-seed={seed[1]}")
    assert TOKEN.findall(result.stdout.str()) == TOKEN.findall(again.stdout.str())


def test_replay_last_reruns_the_schedule_from_the_cache(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(race('"asyncio", "thread"'))
    result = pytester.runpytest("--concur-seed=3")
    result.assert_outcomes(failed=2)
    tokens = TOKEN.findall(result.stdout.str())
    assert len(tokens) == 2
    replay = pytester.runpytest("--concur-replay=last")
    replay.assert_outcomes(failed=2)
    replay.stdout.fnmatch_lines_random(
        [
            f"replay of {token} failed again, after the same * as the recorded run"
            for token in tokens
        ]
    )


def test_the_command_line_asks_for_exploring(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(race(explore=None))
    pytester.runpytest("--concur-explore=50").assert_outcomes(failed=1)
    pytester.makeini(INI + "concur_explore = 50\n")
    pytester.runpytest().assert_outcomes(failed=1)
    # The marker wins over both: explore=0 is off.
    pytester.makepyfile(race(explore=0))
    pytester.runpytest("--concur-explore=50").assert_outcomes(passed=1)


def test_a_replay_that_diverges_says_so(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(race())
    pytester.runpytest("--concur-seed=5").assert_outcomes(failed=1)
    # The code changes under the recording: the fix (a lock) changes which tasks are ready.
    pytester.makepyfile(
        race()
        .replace(
            "    if key not in cache:\n        cache[key] = await fetch(key)",
            "    async with LOCK:\n        if key not in cache:\n            cache[key] = await fetch(key)",
        )
        .replace("FETCHES = []", "FETCHES = []\nLOCK = None")
        .replace(
            "    FETCHES.clear()", "    global LOCK\n    LOCK = asyncio.Lock()\n    FETCHES.clear()"
        )
    )
    result = pytester.runpytest("--concur-replay=last")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "pytest-concur: *test_fetched_once[[]asyncio[]]: replay of b1-* passed, but it "
            "diverged from the recorded run * scheduling decision*: the code changed, or it "
            "depends on something the schedule does not control*"
        ]
    )


def test_a_token_whose_decisions_do_not_match_is_a_divergence(pytester: pytest.Pytester) -> None:
    # Without the cache there is no recording: the digest in the token is what is checked.
    pytester.makepyfile(race())
    result = pytester.runpytest("-p", "no:cacheprovider")
    token = TOKEN.search(result.stdout.str())
    assert token is not None
    digest = token[1][-4:]
    other = f"{int(digest, 16) ^ 1:04x}"
    wrong = token[1][:-4] + other
    result = pytester.runpytest("-p", "no:cacheprovider", f"--concur-replay={wrong}")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            f"replay of {wrong} failed, but it diverged from the recorded run somewhere in its "
            f"* scheduling decisions (their digest is {digest}, the token's {other}): something "
            "the schedule does not control*",
            f"  pytest '*' --concur-replay={token[1]}",
        ]
    )


def test_a_body_that_runs_on_no_explored_loop_runs_once_and_says_so(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import pytest

        RUNS = []

        @pytest.mark.backend("process", explore=20)
        def test_sync():
            RUNS.append(1)

        def test_zz_ran_once():
            assert len(RUNS) == 0  # it ran in the child process, once
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "pytest-concur: test_a_body*.py::test_sync[[]process[]]: ran once, not 20 times: its "
            "body does not run on an event loop or threads pytest-concur schedules*"
        ]
    )


def test_a_single_task_body_stops_after_one_schedule(pytester: pytest.Pytester) -> None:
    # No decision to make: every seed would give the same run.
    pytester.makepyfile(
        """
        import asyncio
        import pytest

        RUNS = []

        @pytest.mark.backend("asyncio", explore=20)
        async def test_one_task():
            RUNS.append(1)
            await asyncio.sleep(0)

        def test_zz_ran_once():
            assert RUNS == [1]
        """
    )
    pytester.runpytest("-p", "no:randomly").assert_outcomes(passed=2)


def test_the_token_is_a_junit_xml_property(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(race())
    result = pytester.runpytest("--junitxml=out.xml")
    result.assert_outcomes(failed=1)
    token = TOKEN.search(result.stdout.str())
    assert token is not None
    root = ET.parse(pytester.path / "out.xml").getroot()
    properties = {p.get("name"): p.get("value") for p in root.iter("property")}
    assert properties["concur_replay"] == token[1]


def test_stress_copies_are_explored_together(pytester: pytest.Pytester) -> None:
    # asyncio's own order runs the copies' steps 0, 1 every time; explored, both orders show.
    pytester.makepyfile(
        """
        import asyncio
        import pytest

        SEEN = []

        @pytest.mark.backend("asyncio", workers=2, explore=30)
        async def test_copies(worker_index):
            await asyncio.sleep(0)
            SEEN.append(worker_index)

        def test_zz_both_orders_ran():
            runs = {tuple(SEEN[i : i + 2]) for i in range(0, len(SEEN), 2)}
            assert len(SEEN) == 60
            assert runs == {(0, 1), (1, 0)}
        """
    )
    pytester.runpytest("-p", "no:randomly").assert_outcomes(passed=2)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--concur-explore=many"],
            "*--concur-explore takes a whole number of schedules, 0 (off) or more, got "
            "'many': e.g. --concur-explore=100.",
        ),
        (["--concur-explore=-1"], "*--concur-explore takes a whole number of schedules*"),
        (
            ["--concur-seed=abc"],
            "*--concur-seed takes a whole number, 0 or more, got 'abc': e.g. --concur-seed=12345*",
        ),
        (
            ["--concur-replay=nonsense"],
            "*--concur-replay takes the replay token a failure printed (like "
            "r1-0123456789-abcd) or 'last', got 'nonsense'.",
        ),
        (
            ["-p", "no:cacheprovider", "--concur-replay=last"],
            "*--concur-replay=last reads the last failing schedules from pytest's cache, which "
            "is turned off (-p no:cacheprovider): pass the token the failure printed instead*",
        ),
    ],
)
def test_bad_options_are_usage_errors_that_name_the_fix(
    pytester: pytest.Pytester, args: list[str], message: str
) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_a_bad_ini_value_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI + "concur_explore = lots\n")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*concur_explore (ini) takes a whole number of schedules*"])


@pytest.mark.parametrize("value", ["-1", "'many'", "True"])
def test_a_bad_marker_value_fails_collection_with_the_fix(
    pytester: pytest.Pytester, value: str
) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.backend("asyncio", explore={value})
        async def test_x():
            pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*@pytest.mark.backend(explore=...) takes a whole number of schedules, 0 (off) or "
            f'more, got {value}: write e.g. @pytest.mark.backend("asyncio", explore=100).'
        ]
    )


def test_xdist_workers_explore_from_the_controllers_seed(pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    pytester.makepyfile(race('"asyncio", "thread"', explore=None))
    result = pytester.runpytest_subprocess("-n", "2", "--concur-explore=50")
    result.assert_outcomes(failed=2)
    seed = re.search(r"pytest-concur: explore seed (\d+) ", result.stdout.str())
    assert seed is not None
    alone = pytester.runpytest("--concur-explore=50", f"--concur-seed={seed[1]}")
    alone.assert_outcomes(failed=2)
    assert sorted(TOKEN.findall(result.stdout.str())) == sorted(TOKEN.findall(alone.stdout.str()))


def test_each_run_is_checked_and_a_check_failure_names_its_schedule(
    pytester: pytest.Pytester,
) -> None:
    # The leak check watches every run; the third run leaves a task behind.
    pytester.makepyfile(
        """
        import asyncio
        import pytest

        RUNS = []

        async def forever():
            await asyncio.Event().wait()

        @pytest.mark.backend("asyncio", explore=10)
        async def test_leaks_on_the_third_run():
            RUNS.append(1)
            await asyncio.gather(asyncio.sleep(0), asyncio.sleep(0))
            if len(RUNS) == 3:
                asyncio.get_running_loop().create_task(forever(), name="left-behind")
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*left-behind*",
            "*- pytest-concur: schedule -*",
            "schedule 3 of 10 failed: r1-*",
        ]
    )
