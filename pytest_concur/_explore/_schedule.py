"""One schedule: the seeded choices of one run of a body, recorded so that a replay can be
checked against them.

A schedule is a seed and a strategy. At every scheduling decision the scheduler asks
:meth:`Schedule.choose` which of ``count`` ready candidates runs next; the answer comes from
a ``random.Random`` seeded with the schedule's seed, so the same program, making the same
decisions in the same order, gets the same answers: that is what makes a replay exact. The
decisions are recorded as ``(count, choice)`` pairs. Their digest goes into the replay
token; a replay compares what it meets with the recording (the full one when pytest's cache
has it, else the digest at the end) and says where it went another way. A replay that
diverged proves nothing about the recorded interleaving.

Invariant: :meth:`pick` draws from the generator (random and PCT strategies) exactly once
per decision with two or more candidates, and never otherwise (one candidate is no decision).

Two strategies. *Random* (``r``) picks uniformly among the ready candidates at every
decision. *PCT* (``p``, probabilistic concurrency testing: priorities and change points)
gives each candidate, the first time it is seen, a random priority, always runs the ready
candidate of highest priority, and at ``depth - 1`` decisions drawn at random among the
first ``horizon`` lowers the priority of the one that was running below every other: a
schedule with few, well-placed preemptions, which random switching at every decision
rarely makes in a long run. Its depth and horizon are part of its seed (the top four bits
the depth, the next sixteen the horizon), so that a token is still all a replay needs.

A third, *listed* (``b``), draws nothing: the token lists its *switches*, the points where
it runs another candidate than the default, which keeps the one that was running when it
can go on, else runs the first ready one. A switch is ``FROM.STEP.TO``: when the candidate
``FROM - 1`` is running and ready at its decision ``STEP`` (from 0; ``FROM`` 0: at the
``STEP``-th decision where the one running could not go on), run the candidate ``TO``
(``b1-1.4.2+3.0.1-9ffe``). Candidates are named by keys alike in every run of the same
program (a thread's place in the order threads were started, a task's in the order tasks
were first seen), and switches by where their thread stands, not by a global count of
decisions: dropping one switch does not move the others, which is what shrinking needs. A *preemption* is a decision
that switches away from a candidate that could have gone on (under any strategy); the
shrinking of a failing schedule (``_run``) and the bounded search look for a failure among
listed schedules with few of them.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import random
import re
from collections.abc import Callable, Sequence
from typing import final

# Strategies, by the letter a token names them with (see the module docstring).
RANDOM = "r"
PCT = "p"
LISTED = "b"
STRATEGIES = {RANDOM: "random", PCT: "PCT", LISTED: "listed"}
# The token's version: a token from another version of the scheme is refused, not misread.
_VERSION = "1"
_TOKEN = re.compile(
    r"^(?P<strategy>[a-z])(?P<version>\d)-(?P<seed>[0-9a-f]{10}|n|\d+\.\d+\.\d+(?:\+\d+\.\d+\.\d+)*)"
    r"-(?P<digest>[0-9a-f]{4})$"
)
# The switches of a listed schedule: (FROM, STEP, TO), see the module docstring.
Switches = tuple[tuple[int, int, int], ...]
_SEED_BITS = 40
# A PCT seed: depth (4 bits), horizon (16 bits), then the random part (20 bits).
_PCT_RANDOM_BITS = 20
_PCT_HORIZON_BITS = 16
PCT_DEPTH = 3


@final
@dataclasses.dataclass(frozen=True)
class Token:
    """What a replay token says: the strategy, the run's seed, the digest of its decisions."""

    strategy: str
    seed: int
    digest: str
    # A listed schedule's switches (its seed is 0).
    switches: Switches = ()

    def __str__(self) -> str:
        if self.strategy == LISTED:
            listed = "+".join(f"{at}.{step}.{to}" for at, step, to in self.switches)
            return f"{self.strategy}{_VERSION}-{listed or 'n'}-{self.digest}"
        return f"{self.strategy}{_VERSION}-{self.seed:010x}-{self.digest}"


def parse_token(text: str) -> Token | None:
    """The token ``text`` spells, or ``None`` if it is not one."""
    match = _TOKEN.match(text.strip().lower())
    if match is None or match["version"] != _VERSION or match["strategy"] not in STRATEGIES:
        return None
    seed = match["seed"]
    listed = seed == "n" or "." in seed
    if listed != (match["strategy"] == LISTED):
        return None
    if not listed:
        return Token(match["strategy"], int(seed, 16), match["digest"])
    switches = tuple(
        (int(at), int(step), int(to))
        for at, step, to in (part.split(".") for part in seed.split("+") if seed != "n")
    )
    if len({(at, step) for at, step, _ in switches}) != len(switches):
        return None  # two switches at one point
    return Token(LISTED, 0, match["digest"], switches)


def run_seed(base: int, nodeid: str, run: int) -> int:
    """The seed of run ``run`` of the item ``nodeid`` in a session whose base seed is ``base``.

    A hash, not ``base + run``: neighbouring items and runs get unrelated schedules, and an
    item's seeds do not change when other tests are added or deselected.
    """
    data = f"{base}\x00{nodeid}\x00{run}".encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=_SEED_BITS // 8).digest(), "big")


def pct_seed(seed: int, horizon: int, depth: int = PCT_DEPTH) -> int:
    """A PCT schedule's seed: ``seed``'s random part, with ``depth`` and ``horizon`` in it."""
    horizon = max(1, min(horizon, (1 << _PCT_HORIZON_BITS) - 1))
    depth = max(1, min(depth, 15))
    random_part = seed & ((1 << _PCT_RANDOM_BITS) - 1)
    return (
        (depth << (_PCT_RANDOM_BITS + _PCT_HORIZON_BITS))
        | (horizon << _PCT_RANDOM_BITS)
        | (random_part)
    )


def pct_parameters(seed: int) -> tuple[int, int]:
    """The depth and horizon a PCT seed holds (see :func:`pct_seed`)."""
    depth = seed >> (_PCT_RANDOM_BITS + _PCT_HORIZON_BITS)
    horizon = (seed >> _PCT_RANDOM_BITS) & ((1 << _PCT_HORIZON_BITS) - 1)
    return max(1, depth), max(1, horizon)


@final
@dataclasses.dataclass(frozen=True)
class Step:
    """One decision, for people: who ran, where it stood ("" if nowhere), of how many ready."""

    who: str
    where: str
    ready: int
    # The decision's number (from 1); at a preemption, who was switched away from, and where.
    number: int = 0
    preempted: str = ""
    preempted_where: str = ""


@final
class Schedule:
    """The decisions of one run, drawn from a seed; optionally checked against a recording."""

    def __init__(
        self,
        seed: int,
        strategy: str = RANDOM,
        *,
        recorded: Sequence[tuple[int, int]] | None = None,
        switches: Switches = (),
    ) -> None:
        self.seed = seed
        self.strategy = strategy
        self.decisions: list[tuple[int, int]] = []
        # At each decision, the place among the candidates of the one that was running, -1
        # if it could not go on (or nobody was running).
        self.currents: list[int] = []
        self._switches = {(at, step): to for at, step, to in switches}
        # At each decision: its point (FROM, STEP) and the ready candidates' keys.
        self.points: list[tuple[int, int]] = []
        self.ready: list[tuple[int, ...]] = []
        self._seen: dict[int, int] = {}
        self._keys: dict[object, int] = {}
        # What a divergence message calls the candidates (a thread scheduler says threads).
        self.noun = "tasks"
        # Who ran at each decision, as what, and where it stood (owner, name, file, line),
        # kept raw: made readable only when a report needs them.
        self.steps: list[tuple[object, str, str, int]] = []
        # At a preemption, the one switched away from, likewise (by decision, from 0).
        self.preempted: dict[int, tuple[object, str, str, int]] = {}
        self._random = random.Random(seed)
        self._recorded = recorded
        self.divergence: str | None = None
        # PCT's state: each candidate's priority, and the decisions that lower one.
        self._priorities: dict[object, float] = {}
        self._changes: dict[int, int] = {}
        if strategy == PCT:
            depth, horizon = pct_parameters(seed)
            points = random.Random(seed ^ 0x5CA1AB1E)
            for low in range(depth - 1, 0, -1):
                self._changes.setdefault(points.randrange(horizon), low)

    @classmethod
    def from_token(
        cls, token: Token, recorded: Sequence[tuple[int, int]] | None = None
    ) -> Schedule:
        """The schedule ``token`` names, checked against ``recorded`` if given."""
        return cls(token.seed, token.strategy, recorded=recorded, switches=token.switches)

    def pick(self, keys: Sequence[object], current: object = None) -> int:
        """Which of the ready candidates ``keys`` (two or more) runs next, as an index.

        ``keys`` name the candidates alike in every run of the same program (the order a
        thread was first seen in, say); ``current`` is the one that was running (PCT
        lowers its priority at a change point; choosing another while it is among ``keys``
        is a preemption).
        """
        at = next((index for index, key in enumerate(keys) if key is current or key == current), -1)
        if current is None:
            at = -1
        count = len(keys)
        ready = tuple(key if isinstance(key, int) else self._key(key) for key in keys)
        running = ready[at] + 1 if at >= 0 else 0
        point = (running, self._seen.get(running, 0))
        self._seen[running] = point[1] + 1
        self.points.append(point)
        self.ready.append(ready)
        if self.strategy == LISTED:
            default = max(at, 0)
            to = self._switches.get(point)
            choice = ready.index(to) if to is not None and to in ready else default
            return self._decide(count, choice, at)
        if self.strategy != PCT:
            return self._decide(count, self._random.randrange(count), at)
        priorities = self._priorities
        for key in keys:
            if key not in priorities:
                # Above every lowered priority (those are below the depth).
                priorities[key] = PCT_DEPTH + self._random.random()
        low = self._changes.get(len(self.decisions))
        if low is not None and current in priorities:
            priorities[current] = float(low) - 1.0 / (2 + len(self.decisions))
        best = max(range(len(keys)), key=lambda index: priorities[keys[index]])
        return self._decide(len(keys), best, at)

    def _key(self, owner: object) -> int:
        """A key for an owner that has none: its place in the order owners were seen."""
        return self._keys.setdefault(owner, len(self._keys))

    def choose(self, count: int) -> int:
        """Which of ``count`` (two or more) ready candidates runs next, from 0."""
        return self.pick(range(count))

    def _decide(self, count: int, choice: int, at: int) -> int:
        recorded = self._recorded
        if recorded is not None and self.divergence is None:
            index = len(self.decisions)
            if index >= len(recorded):
                self.divergence = (
                    f"at scheduling decision {index + 1}: the recorded run made only "
                    f"{len(recorded)}"
                )
            elif recorded[index][0] != count:
                self.divergence = (
                    f"at scheduling decision {index + 1}: {count} {self.noun} were ready where the "
                    f"recorded run had {recorded[index][0]}"
                )
        self.decisions.append((count, choice))
        self.currents.append(at)
        return choice

    def record(
        self,
        step: tuple[object, str, str, int],
        current: tuple[object, str, str, int] | None = None,
    ) -> None:
        """Note who ran at the last decision, and who was running (kept at a preemption)."""
        index = len(self.steps)
        self.steps.append(step)
        if current is not None and index < len(self.decisions):
            choice, at = self.decisions[index][1], self.currents[index]
            if at >= 0 and choice != at:
                self.preempted[index] = current

    def preemptions(self) -> int:
        """How many decisions so far switched away from one that could have gone on."""
        return sum(
            1
            for (_, choice), at in zip(self.decisions, self.currents, strict=True)
            if at >= 0 and choice != at
        )

    def switches(self) -> Switches:
        """The decisions so far that a listed schedule's default would not make (see the
        module docstring): a listed schedule of these makes the same decisions."""
        return tuple(
            (*self.points[index], self.ready[index][choice])
            for index, ((_, choice), at) in enumerate(
                zip(self.decisions, self.currents, strict=True)
            )
            if choice != max(at, 0)
        )

    def digest(self) -> str:
        """Four hex digits that stand for the decisions made so far."""
        data = ",".join(f"{count}.{choice}" for count, choice in self.decisions).encode()
        return hashlib.blake2b(data, digest_size=2).hexdigest()

    def token(self) -> Token:
        """The replay token of this run, as far as it went."""
        if self.strategy == LISTED:
            return Token(LISTED, 0, self.digest(), self.switches())
        return Token(self.strategy, self.seed, self.digest())

    def check_end(self, token: Token) -> None:
        """At the end of a replay of ``token``: note a divergence the decisions show."""
        if self.divergence is not None:
            return
        recorded = self._recorded
        if recorded is not None and len(recorded) > len(self.decisions):
            self.divergence = (
                f"after {len(self.decisions)} scheduling decisions: the recorded run made "
                f"{len(recorded)}"
            )
        elif self.digest() != token.digest:
            self.divergence = (
                f"somewhere in its {len(self.decisions)} scheduling decisions (their digest "
                f"is {self.digest()}, the token's {token.digest})"
            )

    def last_steps(self, limit: int, describe: Callable[[object, str], str]) -> list[Step]:
        """The last ``limit`` decisions, readable; ``describe`` names an owner."""
        start = max(0, len(self.steps) - limit)
        return [self._step(start + offset, describe) for offset in range(len(self.steps) - start)]

    def switch_steps(self, limit: int, describe: Callable[[object, str], str]) -> list[Step]:
        """The last ``limit`` decisions that ran another than the one that was running."""
        numbers = [
            index
            for index, ((_, choice), at) in enumerate(
                zip(self.decisions, self.currents, strict=True)
            )
            if choice != at and index < len(self.steps)
        ]
        return [self._step(index, describe) for index in numbers[-limit:]]

    def _step(self, index: int, describe: Callable[[object, str], str]) -> Step:
        owner, name, filename, lineno = self.steps[index]
        count, choice = self.decisions[index]
        at = self.currents[index]
        left, left_where = "", ""
        if at >= 0 and choice != at:
            other, other_name, other_file, other_line = self.preempted.get(index, (None, "", "", 0))
            left = describe(other, other_name) if other is not None else "the one running"
            left_where = f"{other_file}:{other_line}" if other_file else ""
        return Step(
            describe(owner, name),
            f"{filename}:{lineno}" if filename else "",
            count,
            index + 1,
            left,
            left_where,
        )


@final
class BoundedSearch:
    """Listed schedules with at most ``most`` switches, fewest first, early ones first.

    Iterative bounding (as CHESS bounds preemptions): the default run (no switch), then
    every run with one switch, placed at each decision of the default run with two or more
    ready and going to each candidate the default would not run, then two switches, the
    second at a decision of the one-switch run after its first, and so on. A run's
    decisions are only known once it ran: :meth:`ran` says what a tried schedule met. A
    switch at a decision where the running one could go on is a preemption; one where it
    could not (a free choice) is not, so the schedules with at most ``most`` switches are
    among those with at most ``most`` preemptions.
    """

    def __init__(self, most: int) -> None:
        self.most = most
        self._queue: collections.deque[Switches] = collections.deque([()])

    def next(self) -> Switches | None:
        """The switches of the next schedule to try, or ``None`` when all were tried."""
        return self._queue.popleft() if self._queue else None

    def size(self) -> int | None:
        """How many switches the next schedule has; ``None`` when all were tried."""
        return len(self._queue[0]) if self._queue else None

    def ran(self, switches: Switches, schedule: Schedule) -> None:
        """The schedule listing ``switches`` ran as ``schedule``: its extensions come later."""
        if len(switches) >= self.most:
            return
        currents = schedule.currents
        moved = [
            index
            for index, ((_, choice), at) in enumerate(
                zip(schedule.decisions, currents, strict=True)
            )
            if choice != max(at, 0)
        ]
        after = moved[-1] if moved else -1
        for index in range(after + 1, len(currents)):
            default = max(currents[index], 0)
            point = schedule.points[index]
            self._queue.extend(
                (*switches, (*point, key))
                for choice, key in enumerate(schedule.ready[index])
                if choice != default
            )
