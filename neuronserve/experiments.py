"""Experiments between two served versions: A/B by user, switch-back by time window, explicit versions.

Role: the assignment of a request to an arm (and so a version), reproducible from the experiment's
parameters alone; nothing here serves. Contract:
- A/B: a user's bucket is blake2b-64 of the user id's 8 little-endian bytes (and the salt) modulo
  BUCKETS (10,000); buckets below share x BUCKETS go to the candidate. Stable per user, across
  requests, processes and hosts.
- Switch-back: time from `start_s` is cut in windows of `window_s`; window i's arm is drawn from a
  generator seeded by (seed, i) alone, so any window's arm is known without the others. A window that
  changes arm starts with `burn_in_s` of burn-in: served by its arm, flagged so analysis drops it
  (carry-over from the previous arm: matches already in flight).
- A request naming its version explicitly is served by it, arm "explicit", outside the experiment.
- A request the experiment does not apply to (A/B: no single user id; switch-back: before its start)
  gets the default version, arm "default" (versions.VersionTable.route applies this order).
A design is written as a JSON spec (`serve --experiment FILE`, `experiment assign --spec FILE`), its
keys the CLI's flags: design, control, candidate, share, salt, seed, window_s, burn_in_s, start.
Time comes from an injected clock (a callable returning seconds), so tests run on a fake clock.
The CLI (`neuronserve experiment assign|schedule`) reproduces any (user, time) and the schedule.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from collections.abc import Callable

from neuronserve.config import read_json_object
from neuronserve.errors import ConfigError

BUCKETS = 10_000
CONTROL, CANDIDATE, EXPLICIT, DEFAULT = "control", "candidate", "explicit", "default"
ARMS = (DEFAULT, CONTROL, CANDIDATE, EXPLICIT)  # every arm a reply or a metric label names


def user_bucket(user_id: int, salt: str = "") -> int:
    """The user's bucket in [0, BUCKETS): blake2b-64 of the id's 8 little-endian bytes (signed int64)."""
    digest = hashlib.blake2b(
        int(user_id).to_bytes(8, "little", signed=True), digest_size=8, key=salt.encode()[:64]
    ).digest()
    return int.from_bytes(digest, "little") % BUCKETS


@dataclass(frozen=True)
class Assignment:
    """Which arm and version serve a request, and whether analysis should keep it."""

    arm: str  # control | candidate | explicit
    version: int
    window: int | None = None  # switch-back: the window index
    burn_in: bool = False  # switch-back: in the burn-in after a switch (served, excluded from analysis)


@dataclass(frozen=True)
class ABTest:
    """A/B: `share` of users (by bucket) to `candidate`, the rest to `control`."""

    control: int
    candidate: int
    share: float
    salt: str = ""

    def __post_init__(self) -> None:
        if not 0.0 <= self.share <= 1.0:
            raise ConfigError(f"A/B share must be within [0, 1], got {self.share}")

    def assign(self, user_id: int) -> Assignment:
        if user_bucket(user_id, self.salt) < round(self.share * BUCKETS):
            return Assignment(CANDIDATE, self.candidate)
        return Assignment(CONTROL, self.control)


@dataclass(frozen=True)
class Window:
    """One switch-back window: [start_s, end_s), its arm, and the end of its burn-in (== start_s: none)."""

    index: int
    start_s: float
    end_s: float
    arm: str
    burn_in_end_s: float


@dataclass(frozen=True)
class SwitchBack:
    """Switch-back: every request of a window to that window's arm (see the module docstring)."""

    control: int
    candidate: int
    seed: int
    window_s: float
    burn_in_s: float = 0.0
    start_s: float = 0.0
    candidate_share: float = 0.5  # chance of a window going to the candidate

    def __post_init__(self) -> None:
        if not (math.isfinite(self.window_s) and self.window_s > 0):
            raise ConfigError(f"switch-back window_s must be > 0, got {self.window_s}")
        if not 0.0 <= self.burn_in_s < self.window_s:
            raise ConfigError(
                f"switch-back burn_in_s must be >= 0 and shorter than the window ({self.window_s} s), got {self.burn_in_s}"
            )
        if not 0.0 <= self.candidate_share <= 1.0:
            raise ConfigError(f"switch-back candidate_share must be within [0, 1], got {self.candidate_share}")

    def window_index(self, t: float) -> int:
        if t < self.start_s:
            raise ConfigError(f"time {t} is before the experiment's start {self.start_s}")
        return int((t - self.start_s) // self.window_s)

    def arm_of(self, index: int) -> str:
        """Window `index`'s arm, from (seed, index) alone."""
        draw = random.Random(f"switchback:{self.seed}:{index}").random()
        return CANDIDATE if draw < self.candidate_share else CONTROL

    def window(self, index: int) -> Window:
        start = self.start_s + index * self.window_s
        arm = self.arm_of(index)
        switched = index > 0 and self.arm_of(index - 1) != arm
        return Window(index, start, start + self.window_s, arm, start + (self.burn_in_s if switched else 0.0))

    def assign(self, t: float) -> Assignment:
        window = self.window(self.window_index(t))
        version = self.candidate if window.arm == CANDIDATE else self.control
        return Assignment(window.arm, version, window.index, t < window.burn_in_end_s)

    def schedule(self, until_s: float) -> list[Window]:
        """Every window from the start until `until_s`."""
        return [self.window(i) for i in range(int(math.ceil((until_s - self.start_s) / self.window_s)))]


Design = ABTest | SwitchBack


class Experiment:
    """An A/B test or a switch-back over the injected clock; explicit versions bypass it."""

    def __init__(self, design: Design, clock: Callable[[], float] = time.time) -> None:
        self.design, self.clock = design, clock

    def assign(self, user_id: int, explicit_version: int | None = None) -> Assignment:
        if explicit_version is not None:
            return Assignment(EXPLICIT, explicit_version)
        if isinstance(self.design, ABTest):
            return self.design.assign(user_id)
        return self.design.assign(self.clock())

    def route(self, user_id: int | None) -> Assignment | None:
        """A served request's assignment, or None when the experiment does not apply to it: an A/B
        request without one user id, a switch-back request before the experiment's start."""
        design = self.design
        if isinstance(design, ABTest):
            return None if user_id is None else design.assign(user_id)
        t = self.clock()
        return None if t < design.start_s else design.assign(t)


_SPEC_KEYS = ("design", "control", "candidate", "share", "salt", "seed", "window_s", "burn_in_s", "start")


def design_from_spec(spec: dict, source: str = "experiment spec") -> Design:
    """An ABTest or SwitchBack from a JSON object keyed as the CLI's flags (module docstring); a
    ConfigError naming `source` and the key for anything else."""
    unknown = sorted(set(spec) - set(_SPEC_KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown keys {unknown}; known keys: {', '.join(_SPEC_KEYS)}")
    if spec.get("design") not in ("ab", "switchback"):
        raise ConfigError(f'{source}: \'design\' must be "ab" or "switchback", got {spec.get("design")!r}')
    for key in ("control", "candidate", "seed"):
        value = spec.get(key, 0 if key == "seed" else None)
        if isinstance(value, bool) or not isinstance(value, int) or (key != "seed" and value < 1):
            raise ConfigError(
                f"{source}: {key!r} must be {'an integer' if key == 'seed' else 'a positive integer version'}, got {value!r}"
            )
    if spec["control"] == spec["candidate"]:
        raise ConfigError(f"{source}: control and candidate are both version {spec['control']}; name two versions")
    for key in ("share", "window_s", "burn_in_s", "start"):
        value = spec.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{source}: {key!r} must be a finite number, got {value!r}")
    if not isinstance(spec.get("salt", ""), str):
        raise ConfigError(f"{source}: 'salt' must be a string, got {spec['salt']!r}")
    try:
        return _design(argparse.Namespace(**{k: spec.get(k) for k in _SPEC_KEYS}))
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_design(path: str) -> Design:
    """The design of the JSON spec file at `path` (design_from_spec)."""
    return design_from_spec(read_json_object(path, f"experiment spec {path}"), f"experiment spec {path}")


# ---- the CLI: `neuronserve experiment assign|schedule` ------------------------------------------


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "experiment", help="reproduce an experiment's assignment of a (user, time), or its switch-back schedule"
    )
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    for name, text in (
        ("assign", "the arm and version of one (user, time)"),
        ("schedule", "the switch-back windows until --until"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--design", choices=("ab", "switchback"), default="switchback" if name == "schedule" else "ab")
        p.add_argument("--control", type=int, default=1, help="control version")
        p.add_argument("--candidate", type=int, default=2, help="candidate version")
        p.add_argument(
            "--share",
            type=float,
            default=None,
            help="A/B: the candidate's share of users; switch-back: of windows (default 0.1 / 0.5)",
        )
        p.add_argument("--salt", default="", help="A/B: the salt of the user hash")
        p.add_argument("--seed", type=int, default=0, help="switch-back: the schedule's seed")
        p.add_argument("--window-s", type=float, default=3600.0)
        p.add_argument("--burn-in-s", type=float, default=0.0)
        p.add_argument("--start", type=float, default=0.0, help="switch-back: the experiment's start (unix seconds)")
        p.add_argument(
            "--spec", default=None, help="a JSON spec as `serve --experiment` reads (replaces the flags above)"
        )
        if name == "assign":
            p.add_argument("--user", type=int, required=True)
            p.add_argument("--time", type=float, default=None, help="unix seconds (default: now)")
        else:
            p.add_argument("--until", type=float, required=True, help="unix seconds")
        p.set_defaults(func=_command)


def _design(args) -> Design:
    """A design from the CLI's flags, or a spec's keys (None: the flag's default)."""
    if args.design == "ab":
        return ABTest(args.control, args.candidate, 0.1 if args.share is None else args.share, args.salt or "")
    share = 0.5 if args.share is None else args.share
    return SwitchBack(
        args.control,
        args.candidate,
        args.seed or 0,
        3600.0 if args.window_s is None else args.window_s,
        args.burn_in_s or 0.0,
        args.start or 0.0,
        share,
    )


def _command(args: argparse.Namespace) -> int:
    design = load_design(args.spec) if args.spec else _design(args)
    if args.action == "assign":
        t = time.time() if args.time is None else args.time
        assignment = Experiment(design, clock=lambda: t).assign(args.user)
        print(json.dumps({"user": args.user, "time": t, **asdict(assignment)}))
        return 0
    if not isinstance(design, SwitchBack):
        raise ConfigError("schedule is for --design switchback")
    for window in design.schedule(args.until):
        print(json.dumps(asdict(window)))
    return 0
