"""Running a body under many schedules, and replaying one.

For an item that is explored (``explore=N``, ``--concur-explore=N``, the ``concur_explore``
ini key) or replayed (``--concur-replay``), :func:`prepare` gives the item an exploring
event loop (``_asyncio``) before its fixtures make one, and :func:`run` calls the backend's
runner once per schedule, each time with a fresh :class:`BodyCall` (fresh watches: every
run is checked as a run of its own), until a run fails or the schedules are used up:

- schedule ``i`` of an item is seeded with ``run_seed(base seed, nodeid, i)``, so a session
  with the same ``--concur-seed`` tries the same schedules, and each item its own;
- a run that made no scheduling decision (one task, or none ready at once) ends the
  exploration: every other seed would make the same run;
- a sync body under ``thread`` runs with its threads under a baton-passing scheduler
  (``_threads``), the schedules alternating random and PCT; a run the scheduler did not
  fully control (a thread blocked where it cannot see) is noted as partly controlled;
- a run whose body did not run on the exploring loop nor on controlled threads (the
  ``process`` backend) ends it too: nothing was controlled, and the terminal summary says
  so rather than let N identical runs look like exploration;
- a failing schedule with preemptions is *shrunk* (:func:`_shrink`): listed schedules
  (``_schedule``) with fewer of its switches are run, within :data:`SHRINK_RUNS` runs and
  :data:`SHRINK_SECONDS`, and the one with the fewest preemptions that fails the same way
  (the same exception type raised from the same line) is the one reported;
- a failure keeps the body's own exception and report (the shrunk run's, when shrunk); a
  section under it names the schedule's replay token, the command that reruns it and the
  last steps (a listed schedule's switches), and the token goes into the report's
  ``user_properties`` (hence JUnit XML) and pytest's cache
  (``--concur-replay=last``), with the decisions, so that a replay can say where it
  diverged.

Fixtures are set up once for all the runs, as in stress mode.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shlex
import time
from collections.abc import Callable
from typing import Any, Protocol, final

import pytest

from pytest_concur import _marker, _report
from pytest_concur._backends.base import BodyCall
from pytest_concur._explore._asyncio import Control, describe, exploring_loop
from pytest_concur._explore._schedule import (
    LISTED,
    PCT,
    STRATEGIES,
    BoundedSearch,
    Schedule,
    Switches,
    Token,
    parse_token,
    pct_seed,
    run_seed,
)
from pytest_concur._explore._threads import ThreadScheduler
from pytest_concur._item_loops import set_loop_factory
from pytest_concur._state import backend_of

SEED_OPTION = "--concur-seed"
REPLAY_OPTION = "--concur-replay"
SECTION = "pytest-concur: schedule"
# pytest's cache: nodeid -> {"token": ..., "decisions": [[count, choice], ...] or None}.
CACHE_KEY = "concur/explore/last"
# A longer recording is not kept (the token's digest still tells a divergence).
_MAX_RECORDED = 20_000
_STEPS_SHOWN = 12
# Shrinking's budget, whichever ends first: runs beyond the failing one, and seconds.
SHRINK_RUNS = 50
SHRINK_SECONDS = 3.0
# A thread body is small when its default order made at most this many decisions: then the
# bounded search (at most BOUNDED_SWITCHES switches) is part of its exploration.
SMALL_BODY = 40
BOUNDED_SWITCHES = 2
WORKERINPUT_SEED = "concur_seed"


class _Runner(Protocol):
    def run(self, call: BodyCall) -> None: ...


@final
@dataclasses.dataclass
class _Session:
    """The session's exploration: its base seed, the cache's recordings, notes for the end."""

    seed: int
    seed_given: bool
    replay: str | None
    recorded: dict[str, Any]
    notes: list[str] = dataclasses.field(default_factory=list)
    explored: int = 0


@final
@dataclasses.dataclass(frozen=True)
class _Plan:
    runs: int
    replay: tuple[Token, list[tuple[int, int]] | None] | None
    control: Control


_SESSION = pytest.StashKey[_Session]()
_PLAN = pytest.StashKey[_Plan]()
_SECTION_TEXT = pytest.StashKey[str]()


def session(config: pytest.Config) -> _Session:
    """The session's exploration state; usage errors for bad options, up front."""
    state = config.stash.get(_SESSION, None)
    if state is not None:
        return state
    _marker.default_explore(config)
    option: str | None = config.getoption("concur_seed")
    workerinput: dict[str, Any] = getattr(config, "workerinput", {})
    if option is not None:
        seed, given = _parse_seed(option), True
    elif WORKERINPUT_SEED in workerinput:  # an xdist worker: the controller's seed
        seed, given = int(workerinput[WORKERINPUT_SEED]), False
    else:
        seed, given = random.SystemRandom().randrange(10**8), False
    replay: str | None = config.getoption("concur_replay")
    recorded: dict[str, Any] = {}
    if replay is not None:
        replay = replay.strip()
        cache = getattr(config, "cache", None)
        if replay == "last" and cache is None:
            raise pytest.UsageError(
                f"pytest-concur: {REPLAY_OPTION}=last reads the last failing schedules from "
                "pytest's cache, which is turned off (-p no:cacheprovider): pass the token "
                f"the failure printed instead, e.g. {REPLAY_OPTION}=r1-0123456789-abcd."
            )
        if replay != "last" and parse_token(replay) is None:
            raise pytest.UsageError(
                f"pytest-concur: {REPLAY_OPTION} takes the replay token a failure printed "
                f"(like r1-0123456789-abcd) or 'last', got {replay!r}."
            )
        if cache is not None:
            recorded = dict(cache.get(CACHE_KEY, {}))
    state = config.stash[_SESSION] = _Session(seed, given, replay, recorded)
    return state


def header(config: pytest.Config) -> str:
    """The session header's line: the base seed, and how to get the same schedules again."""
    state = session(config)
    return (
        f"pytest-concur: explore seed {state.seed} ({SEED_OPTION}={state.seed} tries the "
        "same schedules again)"
    )


def prepare(item: pytest.Item) -> None:
    """At the item's setup: explore or replay it, if asked; before its loop exists."""
    state = session(item.config)
    runs = _marker.explore(item)
    replay = _replay_for(item, state)
    if runs == 0 and replay is None:
        return
    control = Control()
    item.stash[_PLAN] = _Plan(runs, replay, control)
    set_loop_factory(item, lambda: exploring_loop(control))


def exploring(item: pytest.Item) -> bool:
    """Whether :func:`prepare` chose to explore or replay ``item``."""
    return _PLAN in item.stash


def run(item: pytest.Item, runner: _Runner, first: BodyCall, again: Callable[[], BodyCall]) -> None:
    """Run the body under each schedule of the item's plan until one fails."""
    __tracebackhide__ = True  # the plugin's frames are not the user's
    plan = item.stash[_PLAN]
    state = session(item.config)
    if plan.replay is not None:
        _replay(item, runner, first, plan, *plan.replay)
        return
    state.explored += 1
    call = first
    threads = _is_thread_body(item, first)
    horizon, partly, first_partly = 8, 0, ""
    search: BoundedSearch | None = None
    drawn = 0  # the random and PCT schedules so far
    for index in range(plan.runs):
        seed = run_seed(state.seed, item.nodeid, index)
        # Thread bodies (the portfolio, docs/explore.md): the default order first; if it
        # was small, every schedule with one switch from it, then those with two, every
        # other run; else (and once those are all tried) random switching at every
        # decision alternating with PCT over a horizon as long as the longest run so far.
        trial = None if not threads else () if index == 0 else _bounded_next(search, index)
        if trial is None:
            schedule = (
                Schedule(pct_seed(seed, horizon), PCT) if threads and drawn % 2 else Schedule(seed)
            )
            drawn += 1
        else:
            schedule = Schedule(0, LISTED, switches=trial)
        scheduler = ThreadScheduler(schedule, call.workers) if threads else None
        failure: BaseException | None = None
        try:
            _run_once(runner, call, plan.control, schedule, scheduler)
        except BaseException as exc:
            if _is_outcome(exc):
                raise
            failure = exc
        if failure is not None:
            # Raised outside the handler: a shrunk run's error has no context of ours.
            part = None if scheduler is None else scheduler.partly
            # A failure the bounded search found needs no shrinking: every schedule with
            # fewer switches was tried, and passed.
            shrunk = (
                None
                if part is not None or trial is not None
                else _shrink(runner, again, plan, schedule, failure, threads)
            )
            _failed(
                item, schedule, f"schedule {index + 1} of {plan.runs}", partly=part, shrunk=shrunk
            )
            raise failure if shrunk is None or shrunk.schedule is schedule else shrunk.error
        if scheduler is not None:
            if scheduler.partly is not None:
                partly += 1
                first_partly = first_partly or scheduler.partly
            if not scheduler.ran or not schedule.decisions:
                break
            if trial == () and index == 0 and len(schedule.decisions) <= SMALL_BODY:
                search = BoundedSearch(BOUNDED_SWITCHES)
                search.next()  # the default order: this run
            if search is not None and trial is not None:
                search.ran(trial, schedule)
            horizon = max(horizon, len(schedule.decisions))
            call = again()
            continue
        if not plan.control.ran or not plan.control.explorable:
            times = f"not {plan.runs} times" if plan.runs > 1 else "unexplored"
            state.notes.append(
                f"{item.nodeid}: ran once, {times}: its body does not run on an event loop "
                "or threads pytest-concur schedules (async bodies under the asyncio and "
                "thread backends and sync bodies under thread do, so far)"
            )
            return
        if not schedule.decisions:
            return  # one task at a time: every schedule is this one
        call = again()
    if partly:
        state.notes.append(
            f"{item.nodeid}: partly controlled in {partly} of the schedules it ran: "
            f"{first_partly}; the other threads ran meanwhile, in no seeded order"
        )


def _bounded_next(search: BoundedSearch | None, index: int) -> Switches | None:
    """The bounded search's schedule for run ``index``, or None for a random or PCT one:
    every one-switch schedule first, then the two-switch ones on every other run."""
    if search is None:
        return None
    size = search.size()
    if size is None or (size > 1 and index % 2):
        return None
    return search.next()


def _is_thread_body(item: pytest.Item, call: BodyCall) -> bool:
    """Whether the body's threads are explored (a sync body under ``thread``)."""
    return backend_of(item) == "thread" and not call.is_async


def _run_once(
    runner: _Runner,
    call: BodyCall,
    control: Control,
    schedule: Schedule,
    scheduler: ThreadScheduler | None = None,
) -> None:
    __tracebackhide__ = True  # the plugin's frames are not the user's
    if scheduler is not None:
        try:
            runner.run(dataclasses.replace(call, function=scheduler.wrap(call.function)))
        finally:
            scheduler.stop()
        return
    control.schedule = schedule
    control.ran = False
    try:
        runner.run(call)
    finally:
        control.schedule = None


@final
@dataclasses.dataclass(frozen=True)
class _Shrunk:
    """What shrinking found: the schedule to report (the failing one if none beat it), the
    error of its run, how many runs it took, and the failing schedule's preemptions."""

    schedule: Schedule
    error: BaseException
    runs: int
    before: int


def _shrink(
    runner: _Runner,
    again: Callable[[], BodyCall],
    plan: _Plan,
    schedule: Schedule,
    error: BaseException,
    threads: bool,
) -> _Shrunk | None:
    """Look for a schedule with fewer preemptions that fails the same way as ``schedule``.

    First the shortest prefix of the failing run's switches whose listed schedule still
    fails (bisection); then delta debugging over those: listed schedules that keep fewer
    of them (all dropped first, then halves, quarters, ... down to one at a time), each
    kept when its run fails the same way with fewer preemptions, or as many and fewer
    switches; its own switches are then shrunk further (a dropped switch can change what
    the later ones meet: each run's own switches are kept, not the list tried). Then, while more than one preemption is left, the bounded search
    (``_schedule.BoundedSearch``) for a failure with fewer. The budget, whichever ends
    first: :data:`SHRINK_RUNS` runs and :data:`SHRINK_SECONDS` seconds.
    """
    __tracebackhide__ = True  # the plugin's frames are not the user's
    before = schedule.preemptions()
    if before == 0 or _is_hang(error):
        return None
    key = _failure_key(error)
    best, best_error = schedule, error
    runs = 0
    stop = time.monotonic() + SHRINK_SECONDS
    tried: dict[Switches, Schedule] = {}

    def fails(trial: Switches) -> bool:
        nonlocal best, best_error, runs
        if trial in tried:
            return False  # ran already (a failure kept then is best, never tried again)
        if runs >= SHRINK_RUNS or time.monotonic() >= stop:
            raise _Budget
        runs += 1
        candidate = tried[trial] = Schedule(0, LISTED, switches=trial)
        call = again()
        scheduler = ThreadScheduler(candidate, call.workers) if threads else None
        try:
            _run_once(runner, call, plan.control, candidate, scheduler)
        except BaseException as exc:
            if _is_outcome(exc) or _is_hang(exc):
                raise  # a hang: the test's deadline passed, nothing more may run
            if (
                (scheduler is None or scheduler.partly is None)
                and _failure_key(exc) == key
                and candidate.preemptions() <= best.preemptions()
                and (
                    candidate.preemptions() < best.preemptions()
                    or len(candidate.switches()) < len(best.switches())
                )
            ):
                best, best_error = candidate, exc
                return True
        return False

    try:
        # The shortest prefix of the switches that still fails (by bisection: after the
        # prefix the run goes on in the default order, without preemptions) ...
        switches = schedule.switches()
        low, high = 0, len(switches)
        while low < high:
            middle = (low + high) // 2
            if fails(switches[:middle]):
                high = middle
            else:
                low = middle + 1
        # ... then delta debugging over what is left.
        switches = best.switches()
        chunk = len(switches)
        while chunk >= 1:
            start = 0
            while start < len(switches):
                if fails(switches[:start] + switches[start + chunk :]):
                    switches = best.switches()
                    chunk = min(chunk, len(switches))
                else:
                    start += chunk
            chunk //= 2
        # Subsets of one run's switches may all need two preemptions where another single
        # one would do: the bounded search, below the preemptions found, from the default.
        search = BoundedSearch(best.preemptions() - 1)
        while best.preemptions() > 1 and (trial := search.next()) is not None:
            ran = tried.get(trial)
            if ran is None:
                fails(trial)
                ran = tried[trial]
            if ran is best:
                search = BoundedSearch(best.preemptions() - 1)
                continue
            search.ran(trial, ran)
    except _Budget:
        pass
    except BaseException as exc:
        if _is_outcome(exc):
            raise
        # A hang in a shrinking run: report the best so far (its error was raised before).
    return _Shrunk(best, best_error, runs, before)


class _Budget(Exception):
    """Shrinking's budget is spent."""


def _failure_key(error: BaseException) -> tuple[str, str, int]:
    """What "fails the same way" compares: the exception's type and where it was raised."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = ("", 0) if tb is None else (tb.tb_frame.f_code.co_filename, tb.tb_lineno)
    return type(error).__qualname__, *where


def _is_hang(error: BaseException) -> bool:
    """A failure at the test's deadline (``_timeout``): nothing more may run."""
    return bool(getattr(error, "concur_hang_report", False))


def _replay(
    item: pytest.Item,
    runner: _Runner,
    call: BodyCall,
    plan: _Plan,
    token: Token,
    recorded: list[tuple[int, int]] | None,
) -> None:
    __tracebackhide__ = True  # the plugin's frames are not the user's
    state = session(item.config)
    schedule = Schedule.from_token(token, recorded)
    scheduler = ThreadScheduler(schedule, call.workers) if _is_thread_body(item, call) else None
    try:
        _run_once(runner, call, plan.control, schedule, scheduler)
    except BaseException as exc:
        if not _is_outcome(exc):
            schedule.check_end(token)
            _failed(
                item,
                schedule,
                "replay",
                token,
                partly=None if scheduler is None else scheduler.partly,
            )
        raise
    schedule.check_end(token)
    if not (plan.control.ran if scheduler is None else scheduler.ran):
        state.notes.append(
            f"{item.nodeid}: replay of {token} passed, but its body does not run on an event "
            "loop pytest-concur schedules: nothing was replayed"
        )
    elif scheduler is not None and scheduler.partly is not None:
        # A wait the scheduler could not see (or a thread the machine did not run for a
        # while) let the others go in no seeded order: say so, not only that it diverged.
        state.notes.append(
            f"{item.nodeid}: replay of {token} passed, but it was partly controlled: "
            f"{scheduler.partly}; the pass says nothing about the recorded interleaving"
        )
    elif schedule.divergence is not None:
        state.notes.append(
            f"{item.nodeid}: replay of {token} passed, but it diverged from the recorded run "
            f"{schedule.divergence}: the code changed, or it depends on something the "
            "schedule does not control (time, randomness, I/O, threads); the pass says "
            "nothing about the recorded interleaving. Explore again to check a fix: "
            f"{_marker.EXPLORE_OPTION}=200."
        )
    else:
        state.notes.append(
            f"{item.nodeid}: replay of {token} made the same {len(schedule.decisions)} "
            "scheduling decisions and passed: the recorded failure came from something the "
            "schedule does not control (time, randomness, I/O, threads)"
        )


def _failed(
    item: pytest.Item,
    schedule: Schedule,
    what: str,
    replayed: Token | None = None,
    *,
    partly: str | None = None,
    shrunk: _Shrunk | None = None,
) -> None:
    """Note the failing schedule: in the report, the JUnit XML properties and the cache."""
    token = schedule.token()
    count = len(schedule.decisions)
    strategy = STRATEGIES[schedule.strategy]
    switches = schedule.strategy == LISTED
    if replayed is None:
        lines = [f"{what} failed: {token} ({strategy}, {count} scheduling decisions)"]
        if shrunk is not None:
            more = f"{shrunk.runs} more run{'s' if shrunk.runs != 1 else ''}"
            if shrunk.schedule is schedule:
                lines.append(
                    f"Not shrunk: no schedule with fewer preemptions failed the same way in "
                    f"{more} ({_preemptions(shrunk.before)})"
                )
            else:
                schedule = shrunk.schedule
                token = schedule.token()
                count = len(schedule.decisions)
                after = schedule.preemptions()
                lines.append(
                    f"Shrunk from {shrunk.before} preemptions to {after} in {more}: {token} "
                    f"({count} scheduling decisions)"
                )
                switches = True
    elif replayed.strategy == LISTED and schedule.divergence is None:
        lines = [
            f"replay of {replayed} failed again, after the same {count} scheduling decisions "
            "as the recorded run"
        ]
        switches = True
    elif schedule.divergence is None:
        lines = [
            f"replay of {replayed} failed again, after the same {count} scheduling decisions "
            "as the recorded run"
        ]
    else:
        lines = [
            f"replay of {replayed} failed, but it diverged from the recorded run "
            f"{schedule.divergence}: something the schedule does not control (time, "
            "randomness, I/O, threads) or a change of the code made it run another way; "
            f"this run's own schedule is {token} ({count} scheduling decisions)"
        ]
    if partly is not None:
        lines.append(f"This run was partly controlled: {partly}; a replay may go another way.")
    nodeid = shlex.quote(item.nodeid)
    lines += [
        "Rerun exactly this interleaving with:",
        f"  pytest {nodeid} {REPLAY_OPTION}={token}",
    ]
    if getattr(item.config, "cache", None) is not None:
        lines.append(f"  (or {REPLAY_OPTION}=last: the last failing schedule of each test)")
    if switches:
        steps = schedule.switch_steps(_STEPS_SHOWN, _describe)
        lines.append(
            "The interleaving, switch by switch (each runs until the next; a preemption "
            "switched away from one that could go on):"
            if steps
            else "The interleaving: no switches, each ran until it could not go on."
        )
    else:
        steps = schedule.last_steps(_STEPS_SHOWN, _describe)
        if steps:
            first = steps[0].number
            lines.append(
                "The last scheduling decisions:" if first > 1 else "The scheduling decisions:"
            )
    root = str(item.config.rootpath)
    for step in steps:
        where = step.where
        if where.startswith(root + os.sep):
            where = where[len(root) + 1 :]
        at = f" from {where}" if where else ""
        line = f"  {step.number:>4}. {step.who} ran{at} (of {step.ready} ready)"
        if switches and step.preempted:
            left = step.preempted_where
            if left.startswith(root + os.sep):
                left = left[len(root) + 1 :]
            line += f", preempting {step.preempted}" + (f" at {left}" if left else "")
        lines.append(line)
    item.stash[_SECTION_TEXT] = "\n".join(lines)
    item.user_properties.append(("concur_replay", str(token)))
    cache = getattr(item.config, "cache", None)
    # A replay that diverged made decisions of its own: its token replays them exactly.
    if cache is not None:
        last = dict(cache.get(CACHE_KEY, {}))
        decisions = schedule.decisions if count <= _MAX_RECORDED else None
        last[item.nodeid] = {"token": str(token), "decisions": decisions}
        cache.set(CACHE_KEY, last)


def _preemptions(count: int) -> str:
    return f"{count} preemption{'s' if count != 1 else ''}"


def _describe(owner: object, name: str) -> str:
    """Who ran at a decision: a controlled thread (``_threads``) or a task (``_asyncio``)."""
    step = getattr(owner, "describe_step", None)
    if step is not None:
        return str(step(name))
    return describe(owner, name)


def add_section(item: pytest.Item, report: pytest.TestReport) -> None:
    """Put the failing schedule's section under the failure in ``report``."""
    _report.add_stashed_section(item, _SECTION_TEXT, report, SECTION)


def summary(config: pytest.Config) -> list[str]:
    """Lines for the end of the session: what was explored and replayed, and what was not."""
    state = config.stash.get(_SESSION, None)
    if state is None:
        return []
    lines = []
    if state.explored and not state.seed_given:
        lines.append(
            f"pytest-concur: explored {state.explored} test(s) from seed {state.seed} "
            f"({SEED_OPTION}={state.seed} tries the same schedules again)"
        )
    lines += [f"pytest-concur: {note}" for note in state.notes]
    return lines


def _replay_for(
    item: pytest.Item, state: _Session
) -> tuple[Token, list[tuple[int, int]] | None] | None:
    """The token to replay for ``item`` and its recorded decisions if the cache has them."""
    if state.replay is None:
        return None
    entry = state.recorded.get(item.nodeid)
    if state.replay == "last":
        if not isinstance(entry, dict) or parse_token(str(entry.get("token"))) is None:
            state.notes.append(
                f"{item.nodeid}: no failing schedule recorded in the cache; run as usual"
            )
            return None
        text = str(entry["token"])
    else:
        text = state.replay
    token = parse_token(text)
    assert token is not None  # checked by session()
    decisions = entry.get("decisions") if isinstance(entry, dict) else None
    recorded = None
    if isinstance(entry, dict) and entry.get("token") == str(token) and decisions is not None:
        recorded = [(int(count), int(choice)) for count, choice in decisions]
    return token, recorded


def _parse_seed(value: str) -> int:
    try:
        seed = int(value.strip(), 0)
    except ValueError:
        seed = -1
    if seed < 0:
        raise pytest.UsageError(
            f"pytest-concur: {SEED_OPTION} takes a whole number, 0 or more, got {value!r}: "
            f"e.g. {SEED_OPTION}=12345 (the header of a run shows the seed it used)."
        )
    return seed


def _is_outcome(error: BaseException) -> bool:
    """Skips, xfails, exits and ^C: outcomes, not failures a schedule caused."""
    return isinstance(
        error,
        (pytest.skip.Exception, pytest.xfail.Exception, pytest.exit.Exception, KeyboardInterrupt),
    )
