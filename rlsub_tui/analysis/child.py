"""The analysis in a child process: the same events as `analysis.analyse`, sent back over a pipe, so the
explorer's process never imports torch and never shares its GIL with the counting.

Children fork from a forkserver (POSIX) that imported torch once, in its own single-threaded process, and
never touched CUDA; where there is no forkserver (Windows) they are spawned. A child ends with its work,
when the consumer cancels or closes the stream, or when the consumer's process exits (it is a daemon).
Killing one is safe for the cache: each finished tensor is one SQLite commit, atomic even under SIGKILL.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Callable, Generator, Iterator

from rlsub_tui.analysis.stream import analyse, reopened
from rlsub_tui.compute.cache import reopen
from rlsub_tui.records.criteria import AnalysisOptions
from rlsub_tui.records.events import Event, Finished
from rlsub_tui.util.errors import InputError
from rlsub_tui.util.processes import process_context, real_stderr

CANCEL_GRACE_SECONDS = 0.5  # a cancelled child may stop between tensors and say so; then it is killed
CHILD_NICENESS = 10  # added to the child's nice value (POSIX): on a busy machine the UI's redraws come first
POLL_SECONDS = 0.05  # how often the consumer's cancelled() is asked while the child works


class AnalysisError(Exception):
    """The child failed other than on bad input, or died: the message is the sentence for the user."""


def analyse_in_child(base: str, runs: list[str], options: AnalysisOptions, timelines: dict | None = None,
                     step_gap: int = 1, cancelled: Callable[[], bool] = lambda: False) -> Iterator[Event]:
    """`analysis.analyse` run in a child process: the same events, the same InputError; any other failure
    of the child, or its death, as an AnalysisError. Cancelled: the child stops (keeping what the cache
    holds) and the stream ends with Finished(complete=False). An analysis the cache holds whole (and no
    timeline pass) is read here, without a child: that needs no torch, and waits for no forkserver."""
    cached = None if timelines else reopen(base, runs, options)
    if cached is not None:
        yield from reopened(cached, base, None, options, step_gap, cancelled)
        return
    finished = False
    for event in _child_stream(_analyse_target, (base, runs, options, timelines, step_gap), cancelled):
        finished = finished or isinstance(event, Finished)
        yield event
    if not finished:  # killed after the grace period: what arrived is what is done
        yield Finished(False)


def detail_in_child(base: str, runs: list[str], options: AnalysisOptions, name: str, chosen: tuple[int, ...]):
    """`matrix_detail.detail` of one tensor, read and computed in a child process: a results.MatrixDetail."""
    for detail in _child_stream(_detail_target, (base, runs, options, name, chosen), lambda: False):
        return detail
    raise AnalysisError(f"the analysis process sent no detail for {name}.")


# ----------------------------------------------------------------------------------------- the child's side
def _analyse_target(send: Callable[[Any], None], cancelled: Callable[[], bool], base, runs, options, timelines,
                    step_gap) -> None:
    from contextlib import closing

    with closing(analyse(base, runs, options, timelines, step_gap, cancelled)) as events:
        for event in events:
            send(event)


def _detail_target(send: Callable[[Any], None], _cancelled, base, runs, options, name, chosen) -> None:
    from rlsub_tui.compute.matrix_detail import detail, read_tensor

    send(detail(name, read_tensor(base, runs, options, name), options, chosen))


class _CancelFlag:
    """cancelled() for the child: true once the consumer sent "cancel" or went away (asked from any thread)."""

    def __init__(self, conn):
        self.conn, self.set, self.lock = conn, False, threading.Lock()

    def __call__(self) -> bool:
        with self.lock:
            if not self.set:
                try:
                    self.set = self.conn.poll() and self.conn.recv() == "cancel"
                except (EOFError, OSError):
                    self.set = True
            return self.set


def _child_main(conn, cwd: str, environ: dict, target, args: tuple) -> None:
    """Entry point of the child: the consumer's folder and environment (a forkserver's are its own), then
    ("item", x) per result, and ("done", None), ("input", sentence) or ("error", "Type: message") at the end."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(environ)
    if hasattr(os, "nice"):
        os.nice(CHILD_NICENESS)  # background work: the interactive process gets the cores first

    def send(item) -> None:
        conn.send(("item", item))

    try:
        try:
            target(send, _CancelFlag(conn), *args)
        except InputError as exc:
            conn.send(("input", str(exc)))
        except Exception as exc:  # the consumer words it as the in-process worker did
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        else:
            conn.send(("done", None))
    except (BrokenPipeError, ConnectionResetError, EOFError):
        pass  # the consumer is gone: nobody to tell
    finally:
        conn.close()


# ----------------------------------------------------------------------------------------- the consumer's side
def _child_stream(target, args: tuple, cancelled: Callable[[], bool]) -> Iterator[Any]:
    """Start a child running target(send, cancelled, *args) and yield what it sends; always ends the child."""
    ctx = process_context()
    ours, theirs = ctx.Pipe(duplex=True)
    child = ctx.Process(target=_child_main, args=(theirs, os.getcwd(), dict(os.environ), target, args),
                        name="rlsub-analysis", daemon=True)
    with real_stderr():  # starts the forkserver again if it is gone
        child.start()
    theirs.close()
    ended = False  # by the child's last message: it is exiting on its own
    try:
        ended = yield from _receive(child, ours, cancelled)
    except (InputError, AnalysisError):
        ended = True
        raise
    finally:
        ours.close()
        _end(child, 2.0 if ended else 0.0)


def _receive(child, conn, cancelled: Callable[[], bool]) -> Generator[Any, None, bool]:
    """What the child sends, until its last message (True) or the end of its grace once cancelled (False)."""
    deadline = None
    while True:
        if deadline is None and cancelled():
            _tell(conn, "cancel")
            deadline = time.monotonic() + CANCEL_GRACE_SECONDS
        if deadline is not None and time.monotonic() > deadline:
            return False
        try:
            if not conn.poll(POLL_SECONDS):
                if child.is_alive() or conn.poll(0):
                    continue
                raise EOFError  # gone, and nothing left to read
            kind, payload = conn.recv()
        except (EOFError, OSError):
            if deadline is not None:
                return True  # it stopped as asked
            raise AnalysisError(_death(child)) from None
        if kind == "item":
            yield payload
        elif kind == "done":
            return True
        elif kind == "input":
            raise InputError(payload)
        else:
            raise AnalysisError(f"the analysis failed: {payload}")


def _tell(conn, message: str) -> None:
    try:
        conn.send(message)
    except OSError:
        pass


def _death(child) -> str:
    """One sentence for a child that ended without finishing, with its exit code."""
    child.join(5)
    code = child.exitcode
    if code is not None and code < 0:
        try:
            why = signal.Signals(-code).name
        except ValueError:
            why = f"signal {-code}"
        more = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"the analysis process was killed by {why}{more} before it finished (exit code {code})."
    return f"the analysis process ended before it finished (exit code {code})."


def _end(child, wait: float) -> None:
    """The child gone and reaped, however the stream ended: given `wait` seconds to exit, then terminated."""
    child.join(wait)
    if child.is_alive():
        child.terminate()
        child.join(2)
    if child.is_alive():
        child.kill()
        child.join()
    child.close()
