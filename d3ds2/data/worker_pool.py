"""A process pool that outlives its workers: a worker killed mid-task (out of memory, a native crash in a mesh
library, kill -9) is reported for the task it held and replaced, and the rest go on; every worker dies with
its parent, so a killed driver leaves no orphans holding memory."""
from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import wait
from typing import Any

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """Exit when ``parent_pid`` dies: the kernel sends SIGKILL (``prctl(PR_SET_PDEATHSIG)``) to a direct child
    on Linux; elsewhere, or under a fork server, a watchdog thread polls the parent once a second."""
    if sys.platform.startswith("linux") and os.getppid() == parent_pid:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            if os.getppid() != parent_pid:  # the parent died before the prctl took effect
                os._exit(1)
            return

    def watch() -> None:
        while True:
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True, name="die-with-parent").start()


def _serve(conn, fn: Callable, args: tuple, parent_pid: int) -> None:
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle; it stops the workers
    while True:
        try:
            item = conn.recv()
        except (EOFError, OSError):
            return
        if item is None:
            return
        conn.send(fn(item, *args))


class _Worker:
    def __init__(self, ctx, fn: Callable, args: tuple) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, fn, args, os.getpid()), daemon=True)
        self.proc.start()
        child.close()
        self.item: Any = None

    def give(self, item: Any) -> bool:
        """Send ``item``; False when the worker is dead (it died idle)."""
        if not self.proc.is_alive():
            return False
        try:
            self.conn.send(item)
        except OSError:
            return False
        self.item = item
        return True

    def stop(self, now: bool) -> None:
        if now:
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except OSError:
                pass
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def imap_surviving(fn: Callable, items: Iterable, args: tuple = (), workers: int = 1,
                   context: multiprocessing.context.BaseContext | None = None) -> Iterator[tuple[Any, Any, int | None]]:
    """Run ``fn(item, *args)`` in ``workers`` processes; yield ``(item, result, None)`` as each finishes, or
    ``(item, None, exitcode)`` when the worker running it died (``exitcode`` -N: killed by signal N). A dead
    worker is replaced. Closing the iterator early kills the busy workers and stops the idle ones."""
    ctx = context or multiprocessing.get_context()
    todo = deque(items)
    pool = [_Worker(ctx, fn, args) for _ in range(max(1, min(workers, len(todo))))] if todo else []
    try:
        while True:
            for i, w in enumerate(pool):
                while w.item is None and todo:
                    if not w.give(todo[0]):
                        w.stop(now=True)
                        pool[i] = w = _Worker(ctx, fn, args)
                        continue
                    todo.popleft()
            busy = [w for w in pool if w.item is not None]
            if not busy:
                return
            ready = set(wait([w.conn for w in busy] + [w.proc.sentinel for w in busy]))
            for i, w in enumerate(pool):
                if w.item is None or (w.conn not in ready and w.proc.sentinel not in ready):
                    continue
                item = w.item
                try:
                    result = w.conn.recv()  # a result sent just before dying is still read
                except (EOFError, OSError):
                    w.proc.join(timeout=10)
                    code = w.proc.exitcode
                    w.stop(now=True)
                    pool[i] = _Worker(ctx, fn, args)
                    yield item, None, code
                    continue
                w.item = None
                yield item, result, None
    finally:
        for w in pool:
            w.stop(now=w.item is not None)
