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

Invariant: :meth:`choose` draws from the generator exactly once per decision with two or
more candidates, and never otherwise (one candidate is no decision).

Two strategies. *Random* (``r``) picks uniformly among the ready candidates at every
decision. *PCT* (``p``, probabilistic concurrency testing: priorities and change points)
gives each candidate, the first time it is seen, a random priority, always runs the ready
candidate of highest priority, and at ``depth - 1`` decisions drawn at random among the
first ``horizon`` lowers the priority of the one that was running below every other: a
schedule with few, well-placed preemptions, which random switching at every decision
rarely makes in a long run. Its depth and horizon are part of its seed (the top four bits
the depth, the next sixteen the horizon), so that a token is still all a replay needs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from collections.abc import Callable, Sequence
from typing import final

# Strategies, by the letter a token names them with (see the module docstring).
RANDOM = "r"
PCT = "p"
STRATEGIES = {RANDOM: "random", PCT: "PCT"}
# The token's version: a token from another version of the scheme is refused, not misread.
_VERSION = "1"
_TOKEN = re.compile(
    r"^(?P<strategy>[a-z])(?P<version>\d)-(?P<seed>[0-9a-f]{10})-(?P<digest>[0-9a-f]{4})$"
)
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

    def __str__(self) -> str:
        return f"{self.strategy}{_VERSION}-{self.seed:010x}-{self.digest}"


def parse_token(text: str) -> Token | None:
    """The token ``text`` spells, or ``None`` if it is not one."""
    match = _TOKEN.match(text.strip().lower())
    if match is None or match["version"] != _VERSION or match["strategy"] not in STRATEGIES:
        return None
    return Token(match["strategy"], int(match["seed"], 16), match["digest"])


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


@final
class Schedule:
    """The decisions of one run, drawn from a seed; optionally checked against a recording."""

    def __init__(
        self,
        seed: int,
        strategy: str = RANDOM,
        *,
        recorded: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        self.seed = seed
        self.strategy = strategy
        self.decisions: list[tuple[int, int]] = []
        # Who ran at each decision, as what, and where it stood (owner, name, file, line),
        # kept raw: made readable only when a report needs them.
        self.steps: list[tuple[object, str, str, int]] = []
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

    def pick(self, keys: Sequence[object], current: object = None) -> int:
        """Which of the ready candidates ``keys`` (two or more) runs next, as an index.

        ``keys`` name the candidates alike in every run of the same program (the order a
        thread was first seen in, say); ``current`` is the one that was running (PCT
        lowers its priority at a change point).
        """
        if self.strategy != PCT:
            return self.choose(len(keys))
        priorities = self._priorities
        for key in keys:
            if key not in priorities:
                # Above every lowered priority (those are below the depth).
                priorities[key] = PCT_DEPTH + self._random.random()
        low = self._changes.get(len(self.decisions))
        if low is not None and current in priorities:
            priorities[current] = float(low) - 1.0 / (2 + len(self.decisions))
        best = max(range(len(keys)), key=lambda index: priorities[keys[index]])
        return self._decide(len(keys), best)

    def choose(self, count: int) -> int:
        """Which of ``count`` (two or more) ready candidates runs next, from 0."""
        return self._decide(count, self._random.randrange(count))

    def _decide(self, count: int, choice: int) -> int:
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
                    f"at scheduling decision {index + 1}: {count} tasks were ready where the "
                    f"recorded run had {recorded[index][0]}"
                )
        self.decisions.append((count, choice))
        return choice

    def digest(self) -> str:
        """Four hex digits that stand for the decisions made so far."""
        data = ",".join(f"{count}.{choice}" for count, choice in self.decisions).encode()
        return hashlib.blake2b(data, digest_size=2).hexdigest()

    def token(self) -> Token:
        """The replay token of this run, as far as it went."""
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
        return [
            Step(
                describe(owner, name),
                f"{filename}:{lineno}" if filename else "",
                self.decisions[start + offset][0],
            )
            for offset, (owner, name, filename, lineno) in enumerate(self.steps[start:])
        ]
