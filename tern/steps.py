"""Run a setup's steps side by side where they do not depend on each other, timing each.

A step is a name, a function and the names of the steps it needs (or merely comes after). Every step runs on its own
thread as soon as the steps it needs are done, so a CPU-bound build runs beside network-bound
fetches. Each step's function reports its own progress in whole lines (prefixed with its name
by convention); this module adds one line per finished step with its seconds, and after all
steps have ended, the full output of each failure (the ``output`` attribute of the error a
step raised: its failing command's output) under the one-line error that says what to do.

Standard library only: ``make setup`` runs this with the system's python, before the venv exists.
"""

from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Sequence

from tern.core.errors import TernError

#: Returned by a step that found its result already in place (nothing done, nothing printed).
CACHED = "cached"


@dataclass(frozen=True)
class Step:
    """One unit of setup work."""

    #: Short name, used as the prefix of the step's lines.
    name: str
    #: Does the work; returns a few words for the user ("built", "fetched") or :data:`CACHED`.
    run: Callable[[], str]
    #: Names of steps that must have succeeded before this one starts.
    needs: tuple[str, ...] = ()
    #: Names of steps that must have ended (however) before this one starts.
    after: tuple[str, ...] = ()


@dataclass
class Outcome:
    """How one step ended."""

    name: str
    #: "done", "failed" or "skipped" (a step it needs did not succeed).
    state: str
    seconds: float = 0.0
    note: str = ""
    #: For a failure: the failing command's output (or a traceback for an unexpected error).
    output: str = ""


@dataclass
class _Board:
    """What the step threads share: their outcomes and one event per step."""

    outcomes: dict[str, Outcome] = field(default_factory=dict)
    finished: dict[str, threading.Event] = field(default_factory=dict)


def run_steps(steps: Sequence[Step], say: Callable[[str], None]) -> list[Outcome]:
    """Run ``steps`` (each after the steps it needs), print one line per finished step with its
    seconds, and return every step's outcome in the order given.

    A step whose need failed or was skipped is skipped. Failures are reported by the returned
    outcomes; see :func:`report_failures`.
    """
    names = [step.name for step in steps]
    unknown = {other for step in steps for other in step.needs + step.after} - set(names)
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"steps {names} need unknown {sorted(unknown)} or repeat a name")
    board = _Board(finished={name: threading.Event() for name in names})
    threads = [threading.Thread(target=_run_one, args=(step, board, say), name=f"step-{step.name}", daemon=True)
               for step in steps]
    for thread in threads:
        thread.start()
    for thread in threads:
        # join with a timeout so that Ctrl-C reaches the main thread at once
        while thread.is_alive():
            thread.join(0.2)
    return [board.outcomes[name] for name in names]


def _run_one(step: Step, board: _Board, say: Callable[[str], None]) -> None:
    try:
        for other in step.needs + step.after:
            board.finished[other].wait()
        blocked = [need for need in step.needs if board.outcomes[need].state != "done"]
        if blocked:
            board.outcomes[step.name] = Outcome(step.name, "skipped", note=f"not run: {', '.join(blocked)} did not succeed")
            return
        start = time.monotonic()
        try:
            note = step.run()
        except Exception as exc:  # noqa: BLE001 - any error of a step is reported, not raised in a thread
            # Tern's own errors carry a whole one-line message (and maybe the failing command's
            # output); for anything else the traceback is what helps.
            own = isinstance(exc, TernError)
            outcome = Outcome(step.name, "failed", time.monotonic() - start,
                              str(exc) if own else f"{type(exc).__name__}: {exc}",
                              getattr(exc, "output", "") if own else traceback.format_exc())
        else:
            outcome = Outcome(step.name, "done", time.monotonic() - start, note)
        board.outcomes[step.name] = outcome
        if outcome.state == "failed":
            say(f"{step.name}: FAILED after {outcome.seconds:.1f} s: {outcome.note}")
        elif outcome.note != CACHED:
            say(f"{step.name}: {outcome.note} in {outcome.seconds:.1f} s")
    finally:
        board.outcomes.setdefault(step.name, Outcome(step.name, "failed", note="interrupted"))
        board.finished[step.name].set()


def report_failures(outcomes: Sequence[Outcome], say: Callable[[str], None]) -> None:
    """Print each failed step's full output under a header naming the step and its error."""
    for outcome in outcomes:
        if outcome.state != "failed":
            continue
        say(f"---- {outcome.name} failed: {outcome.note}")
        if outcome.output.strip():
            say(outcome.output.rstrip("\n"))
            say(f"---- end of {outcome.name}'s output")
    for outcome in outcomes:
        if outcome.state == "skipped":
            say(f"{outcome.name}: {outcome.note}")


def summary(outcomes: Sequence[Outcome], seconds: float) -> str:
    """One line: the wall time and each step that did work, with its seconds."""
    worked = [f"{o.name} {o.seconds:.1f} s" for o in outcomes if o.state == "done" and o.note != CACHED]
    failed = [o.name for o in outcomes if o.state != "done"]
    if failed:
        return f"setup: {', '.join(failed)} did not succeed ({seconds:.1f} s)"
    if not worked:
        return f"setup: all up to date ({seconds:.1f} s)"
    return f"setup: done in {seconds:.1f} s ({', '.join(worked)}; steps ran side by side)"
