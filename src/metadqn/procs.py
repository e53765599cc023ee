"""Process hygiene for ``metadqn pipeline`` (#11): its children die with it, and it dies in one line.

Three pieces, all free of Prefect (``flows/pipeline.py`` wires them):

- :func:`run_logged` runs a child (``dvc repro <stage>``) in **its own session and process group**, streams its
  stdout and stderr to ours while writing both, line by line, to a log file, and kills the whole group
  (``dvc``, the stage command it runs, the stage's worker processes) when the child ends, fails or is
  interrupted: nothing started by a stage outlives the call. Its own group also keeps a terminal's Ctrl-C
  away from the stage: only the pipeline gets it, and it decides.
- :class:`Guard`, a watchdog process, covers the case no code of ours sees: the pipeline killed with SIGKILL
  (OOM killer, ``systemctl stop`` with ``KillMode=process``, ``kill -9``). It reads a pipe from the pipeline;
  the kernel closes that pipe whichever way the pipeline dies, and on end-of-file the guard kills every
  process group and process it was told about (stages first, then the temporary Prefect server they report
  to). It also holds an inherited descriptor of the pipeline lock and keeps it until everything it kills is
  gone, so the lock is released only when the whole tree has died, and a second run started meanwhile is
  refused in one line instead of crashing into DVC's repository lock.
  Why not ``prctl(PR_SET_PDEATHSIG)`` alone: it reaches only the direct child (``dvc``, which dies of
  SIGTERM without terminating its child: the stage command and its workers live on), it cannot be set on the
  temporary Prefect server (Prefect starts that process), it fires when the *thread* that started the child
  ends, and it needs ``preexec_fn``, which is unsafe in a process with threads, as Prefect's is.
  :func:`set_parent_death_signal` is still here: the guard uses it as a second trigger.
- :class:`Interrupts` turns SIGINT, SIGTERM and SIGHUP into one line on stderr: it has the guard kill the
  tree, waits until it is gone, prints the line and leaves with ``128 + signal`` (130, 143, 129), without
  unwinding through Prefect (which would log its crash handling and, when a terminal's Ctrl-C has also
  stopped its temporary server, retry the API for pages of tracebacks).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import IO, BinaryIO, NamedTuple

GRACE_S = 5.0
"""How long a process group gets between SIGTERM and SIGKILL (a stage reports its crash to Prefect first)."""
GONE_TIMEOUT_S = 5.0
"""How long to wait, after SIGKILL, for the kernel to take the processes away."""
PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Asks the kernel to send ``sig`` to this process when its parent (thread) dies; Linux only.

    Returns False where it is not available (another OS, no libc), so callers treat it as a bonus.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


class _Proc(NamedTuple):
    group: int
    state: str
    """The state letter (R, S, Z...)."""
    parent: int


def _proc_table() -> dict[int, _Proc] | None:
    """pid -> (process group, state letter, parent pid) of every process, from /proc; None without /proc."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    table: dict[int, _Proc] = {}
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                stat = handle.read().decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split at the last ')'
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) >= 3:
            table[int(name)] = _Proc(group=int(fields[2]), state=fields[0], parent=int(fields[1]))
    return table


def _living(state: str) -> bool:
    # a zombie is dead but not yet reaped (its parent may be the pipeline, which is busy or gone): it must not
    # keep a lock or make us wait
    return state not in ("Z", "X", "x")


def _probe(kill: Callable[[int, int], None], target: int) -> bool:
    """Signal 0 (without /proc): whether ``target`` exists; a zombie counts, for want of a better source."""
    try:
        kill(target, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still running (zombies do not count)."""
    table = _proc_table()
    if table is None:
        return _probe(os.killpg, pgid)
    return any(p.group == pgid and _living(p.state) for p in table.values())


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` is still running (a zombie does not count)."""
    table = _proc_table()
    if table is None:
        return _probe(os.kill, pid)
    return pid in table and _living(table[pid].state)


def _signal(kill: Callable[[int, int], None], target: int, sig: int) -> None:
    # gone already (or the number now belongs to someone else's process: leave it alone)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        kill(target, sig)


def terminate(groups: Iterable[int] = (), pids: Iterable[int] = (), grace: float = GRACE_S) -> None:
    """SIGTERM to each process group and process, SIGKILL to what is left after ``grace`` seconds; returns
    when all are gone (or GONE_TIMEOUT_S after the SIGKILL)."""
    groups, pids = [g for g in groups if g > 1], [p for p in pids if p > 1]  # never 0/1: "my group", init

    def left() -> tuple[list[int], list[int]]:
        return [g for g in groups if group_alive(g)], [p for p in pids if pid_alive(p)]

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, GONE_TIMEOUT_S)):
        live_groups, live_pids = left()
        if not live_groups and not live_pids:
            return
        for g in live_groups:
            _signal(os.killpg, g, sig)
        for p in live_pids:
            _signal(os.kill, p, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(left()):
            time.sleep(0.05)


class Guard:
    """A watchdog process that kills what the pipeline started if the pipeline dies (see the module docstring).

    ``keep_fds`` (the pipeline lock) are inherited by the guard and held until everything it was told about is
    gone. :meth:`release` ends it without killing anything (the normal end of a run); :meth:`kill` has it kill
    everything now and waits for that.
    """

    def __init__(self, keep_fds: Sequence[int] = (), grace: float = GRACE_S) -> None:
        read, write = os.pipe()  # both non-inheritable: no other child keeps the write end (and the EOF) away
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "metadqn.procs", str(grace)], stdin=read, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, pass_fds=tuple(keep_fds),
                # its own session: a terminal's Ctrl-C or hang-up must not kill the one that cleans up after them
                start_new_session=True)
        finally:
            os.close(read)
        self._fd: int | None = write

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _send(self, line: str) -> None:
        # one os.write of a short line: atomic on a pipe, and no Python buffer lock, so it is safe from a signal
        # handler that interrupted another send
        if self._fd is not None:
            with contextlib.suppress(OSError):  # the guard is gone; nothing to tell it
                os.write(self._fd, (line + "\n").encode())

    def watch_group(self, pgid: int) -> None:
        self._send(f"group {pgid}")

    def forget_group(self, pgid: int) -> None:
        self._send(f"ungroup {pgid}")

    def watch_pid(self, pid: int) -> None:
        self._send(f"pid {pid}")

    def _finish(self, command: str, timeout: float) -> None:
        self._send(command)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout)

    def kill(self, timeout: float = GRACE_S + 2 * GONE_TIMEOUT_S) -> None:
        """Kills everything watched; returns when it is gone (or after ``timeout`` seconds)."""
        self._finish("kill", timeout)

    def release(self, timeout: float = 5.0) -> None:
        """Ends the guard without killing anything: the run ended, its children are gone or ours to stop."""
        self._finish("release", timeout)


def _guard_main(grace: float) -> int:
    """The guard process: collects what to watch from stdin; on ``kill``, end-of-file or a new parent (the
    pipeline died) it kills all of it, stage groups first and single processes (the Prefect server) last,
    then exits, which drops the inherited lock descriptor last. It ignores SIGINT, SIGHUP and SIGTERM (the
    parent-death signal only wakes it up): the pipeline decides, or its death does."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    parent = os.getppid()
    # The signal handler only wakes the loop below (select returns early); it never raises: an exception from
    # a handler that lands between the loop and the killing would end the guard without killing anything.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    # a second trigger besides end-of-file, in case a bug leaked the pipe's write end into another process
    set_parent_death_signal(signal.SIGTERM)
    groups: set[int] = set()
    pids: set[int] = set()
    fd, pending = sys.stdin.fileno(), b""
    while os.getppid() == parent:  # reparented: the pipeline is gone, even if the pipe is not closed
        try:
            ready, _, _ = select.select([fd], [], [], 0.5)
        except InterruptedError:
            continue
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break  # end-of-file: the pipeline exited or was killed
        *lines, pending = (pending + chunk).split(b"\n")
        for raw in lines:
            command, _, arg = raw.decode(errors="replace").strip().partition(" ")
            if command == "release":
                return 0
            if command == "kill":
                parent = -1  # leave the loop and kill
            elif command in ("group", "ungroup", "pid", "unpid") and arg.isdigit():
                target = groups if command in ("group", "ungroup") else pids
                (target.discard if command.startswith("un") else target.add)(int(arg))
    terminate(groups=groups, grace=grace)
    terminate(pids=pids, grace=grace)
    return 0


@dataclass(frozen=True)
class LoggedRun:
    """How a child run by :func:`run_logged` ended."""

    returncode: int
    log: Path
    error_line: str
    """The most telling error line the child printed on stderr (empty if none)."""


# DVC's own summary of a failed stage ("ERROR: failed to reproduce 'x': failed to run: <cmd>, exited with 2") says
# which stage failed, not why: the stage's own message comes first
_DVC_SUMMARY = re.compile(r"^ERROR: failed to reproduce\b")
_EXITED = re.compile(r"exited with (-?\d+)")
_ERROR = re.compile(r"^(internal error|error)\b:?", re.IGNORECASE)


def error_line(lines: Sequence[str]) -> str:
    """The line that best says why a child failed, from its stderr: the last ``error: ...`` line (metadqn's
    one-line failures) other than DVC's summary, else the last line naming an error or exception, else the
    last line the stage printed (a shell's "command not found"), else DVC's summary."""
    text = [line.strip() for line in lines if line.strip()]
    own = [line for line in text if not _DVC_SUMMARY.match(line)]
    for pick in ((line for line in reversed(own) if _ERROR.match(line)),
                 (line for line in reversed(own) if re.search(r"error|exception|traceback", line, re.I)),
                 reversed(own), reversed(text)):
        for line in pick:
            return line
    return ""


def stage_exit_code(lines: Sequence[str], default: int) -> int:
    """The stage command's own exit code from DVC's summary line, else ``default`` (dvc's code)."""
    for line in reversed(lines):
        if _DVC_SUMMARY.match(line.strip()) and (m := _EXITED.search(line)):
            return int(m.group(1))
    return default


def log_path(folder: Path, name: str, when: datetime | None = None) -> Path:
    """``<folder>/<YYYYmmdd-HHMMSS>-<name>.log`` (local time; a numeric suffix if that file exists)."""
    stamp = (when or datetime.now()).strftime("%Y%m%d-%H%M%S")
    path = folder / f"{stamp}-{name}.log"
    n = 1
    while path.exists():
        n += 1
        path = folder / f"{stamp}-{name}-{n}.log"
    return path


class _Tee:
    """Copies one pipe to a terminal stream as it comes (chunks: progress output without newlines streams too)
    and to the shared log file in whole lines (so stdout and stderr lines never interleave mid-line)."""

    def __init__(self, pipe: IO[bytes], out: BinaryIO | None, log: BinaryIO, lock: threading.Lock,
                 tail: deque[str] | None) -> None:
        self._pipe, self._out, self._log, self._lock, self._tail = pipe, out, log, lock, tail
        self._partial = b""
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _lines(self, data: bytes) -> None:
        with self._lock:
            self._log.write(data)
        if self._tail is not None:
            self._tail.extend(data.decode(errors="replace").splitlines())

    def _run(self) -> None:
        fd = self._pipe.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            if self._out is not None:
                try:
                    self._out.write(chunk)
                    self._out.flush()
                except (OSError, ValueError):  # our terminal is gone: keep logging
                    self._out = None
            data = self._partial + chunk
            cut = data.rfind(b"\n") + 1
            self._partial = data[cut:]
            if cut:
                self._lines(data[:cut])
        if self._partial:
            self._lines(self._partial + b"\n")
        self._pipe.close()


def _binary(stream: object) -> BinaryIO | None:
    buffer = getattr(stream, "buffer", None)
    return buffer if buffer is not None else None


def run_logged(cmd: Sequence[str], log: Path, *, env: Mapping[str, str] | None = None,
               guard: Guard | None = None, grace: float = GRACE_S, cwd: Path | None = None) -> LoggedRun:
    """Runs ``cmd`` in its own session and process group, streaming its output to ours and into ``log``.

    The guard (if any) watches the group while it runs. However the call ends (normally, with an exception,
    or with a signal raised as one, such as Prefect's SIGTERM), what is left of the group is terminated
    (SIGTERM, SIGKILL after ``grace`` seconds) before it returns: a stage's stray process never outlives it.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    child_env = dict(os.environ if env is None else env)
    # Python children write to pipes now: unbuffered, so that their output streams instead of arriving at exit
    child_env["PYTHONUNBUFFERED"] = "1"
    lock = threading.Lock()
    tail: deque[str] = deque(maxlen=400)
    sys.stdout.flush()
    sys.stderr.flush()
    with open(log, "wb", buffering=0) as sink:  # unbuffered: what was written is on disk even after os._exit
        sink.write(f"# {' '.join(cmd)}  (started {datetime.now().isoformat(timespec='seconds')})\n".encode())
        proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=child_env, cwd=cwd, start_new_session=True)
        pgid = proc.pid  # a new session's leader: its pid names the group
        if guard is not None:
            guard.watch_group(pgid)
        assert proc.stdout is not None and proc.stderr is not None
        # the error line comes from stderr only (stdout carries DVC's progress and the stage's results)
        tees = [_Tee(proc.stdout, _binary(sys.stdout), sink, lock, None),
                _Tee(proc.stderr, _binary(sys.stderr), sink, lock, tail)]
        try:
            returncode = proc.wait()
        finally:
            # the group outlives its leader when a stage leaves a process behind; and an exception here (a
            # signal) means the leader may still run
            terminate(groups=[pgid], grace=grace)
            proc.wait()
            for tee in tees:
                tee.thread.join(timeout=5.0)  # the pipes close when the group's last writer is gone
            if guard is not None:
                guard.forget_group(pgid)
        with lock:
            sink.write(f"# exit code {returncode}\n".encode())
    lines = list(tail)
    return LoggedRun(returncode=stage_exit_code(lines, returncode), log=log, error_line=error_line(lines))


SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


class Interrupts:
    """SIGINT, SIGTERM and SIGHUP as one line on stderr and exit code 128 + signal (130, 143, 129).

    On the first signal: logging is switched off (no library prints its teardown), ``on_signal`` runs (it has
    the guard kill the process tree and waits for that), ``message(signal name)`` is written to stderr, and the
    process leaves with ``os._exit``: nothing unwinds through Prefect's engine. Further signals while that
    happens are ignored. :meth:`arm` (re)installs the handlers; it must be called again after code that
    replaces them (Prefect's flow engine swaps in its own SIGTERM handler at the start of every flow run).
    """

    def __init__(self, on_signal: Callable[[], None], message: Callable[[str], str]) -> None:
        self._on_signal, self._message = on_signal, message
        self._fired = False

    def arm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may install handlers; the caller's defaults stay
        for sig in SIGNAL_EXIT:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._fired:
            return
        self._fired = True
        import logging

        logging.disable(logging.CRITICAL)
        try:
            self._on_signal()
        finally:
            name = signal.Signals(signum).name
            with contextlib.suppress(OSError):
                os.write(2, (self._message(name).rstrip("\n") + "\n").encode())
            os._exit(SIGNAL_EXIT.get(signal.Signals(signum), 128 + signum))


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` in the process tree (from /proc; empty without it)."""
    children: dict[int, list[int]] = {}
    for child, proc in (_proc_table() or {}).items():
        if _living(proc.state):
            children.setdefault(proc.parent, []).append(child)
    out, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(children.get(child, []))
    return out


def guard_descendants(poll_s: float = 0.5) -> Guard | None:
    """Makes everything this process starts die with it, even by SIGKILL: a :class:`Guard` is told every
    descendant (polled from /proc every ``poll_s`` seconds) and kills the last ones it knows of when this
    process dies. A stage command calls it first: killed with kill -9 (or its ``dvc repro``), a stage would
    otherwise leave its worker processes and the temporary Prefect servers it and they started running, and
    holding its output pipes open. On a normal exit the guard is released and kills nothing. None without /proc.
    """
    import atexit

    if not os.path.isdir("/proc"):
        return None
    guard = Guard()
    me = os.getpid()

    def watch() -> None:
        known: set[int] = set()
        while True:
            now = set(descendants(me)) - {guard.pid}
            for pid in now - known:
                guard.watch_pid(pid)
            for pid in known - now:  # gone: its number may be reused by someone else's process
                guard._send(f"unpid {pid}")
            known = now
            time.sleep(poll_s)

    threading.Thread(target=watch, name="metadqn-guard-descendants", daemon=True).start()
    atexit.register(guard.release)
    return guard


if __name__ == "__main__":
    sys.exit(_guard_main(float(sys.argv[1]) if len(sys.argv) > 1 else GRACE_S))
