"""The analysis' processes: where they start (a forkserver that preloads torch, else spawn) and Ctrl-C around
the moments that must not be cut in two."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
from contextlib import contextmanager

# Imported by the forkserver once, so that a child starts with torch and the engine loaded, and with the objects
# it inherits out of its garbage collector's reach (forkserver_preload).
PRELOAD = ["rlsub_tui.compute.forkserver_preload"]

def process_context() -> multiprocessing.context.BaseContext:
    """Where the analysis' processes start: the forkserver that preloads torch and the engine, else spawn."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


def start_server() -> None:
    """Start the forkserver now (it imports torch in its own process, in parallel): call it early and off
    the event loop; a no-op where children are spawned, and cheap once it runs."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        process_context()
        from multiprocessing import forkserver

        with real_stderr(), _sigint_ignored():
            forkserver.ensure_running()


@contextmanager
def _sigint_handled(handler):
    """SIGINT handled by `handler` for the block, the previous handler restored after. Only the main thread
    can set a handler: elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _sigint_ignored():
    """Ctrl-C (SIGINT to the terminal's whole process group) ignored while the forkserver starts: it inherits
    that through exec, so neither its import of torch nor the children it forks print a traceback; the
    process that started it handles Ctrl-C and ends them."""
    return _sigint_handled(signal.SIG_IGN)


@contextmanager
def sigint_deferred():
    """Ctrl-C held back for the block and raised (KeyboardInterrupt) at its end: around a step that must not be
    cut in two, such as a worker process's start, which would otherwise outlive its parent."""
    caught = []
    with _sigint_handled(lambda *_: caught.append(True)):
        yield
    if caught:
        raise KeyboardInterrupt


@contextmanager
def real_stderr():
    """multiprocessing hands sys.stderr's file descriptor to the helper processes it starts (the resource
    tracker, the forkserver); a running Textual app replaces sys.stderr with an object whose fileno() is -1,
    which makes that fail. For the few milliseconds of a start, the interpreter's own stderr stands in."""
    try:
        usable = sys.stderr is None or sys.stderr.fileno() >= 0
    except Exception:  # no descriptor at all: multiprocessing then passes none
        usable = True
    if usable:
        yield
        return
    saved = sys.stderr
    sys.stderr = sys.__stderr__ if sys.__stderr__ is not None else open(os.devnull, "w")
    try:
        yield
    finally:
        sys.stderr = saved
