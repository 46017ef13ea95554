"""The parent side of a host process: spawn, call with a deadline, kill the tree.

Modelled on loky's ``process_executor``: a call waits on the result pipe *and* the
process sentinel (a pidfd) together, tells a reply from a crash, a hang and a poisoned
channel, and a broken host is never reused. This class is the one boundary where
``OSError``/``EOFError`` and frame errors become :mod:`p11guard` exceptions.
"""

from __future__ import annotations

import itertools
import math
import os
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import psutil

from p11guard.base import (
    ChannelPoisoned,
    HostCrashed,
    HostError,
    HostStartError,
    HostTimeout,
    RemoteError,
    RequestError,
    Secret,
    remote_error,
)
from p11guard.host._launch import ENV_PASSTHROUGH, child_env, host_command
from p11guard.host._output import HostOutput
from p11guard.protocol import MAX_FRAME, Channel, FrameError, decode, encode

__all__ = ["ENV_PASSTHROUGH", "HostProcess"]


def _signal_name(code: int | None) -> str | None:
    if code is None or code >= 0:
        return None
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


class HostProcess:
    """One host process and the pipe to it.

    Create with :meth:`spawn`. One call at a time (the host has one thread); :meth:`kill`
    may be called from any thread, also while another thread is blocked in :meth:`call`.

    Note:
        The host dies with the *thread* that spawned it (``PR_SET_PDEATHSIG``): spawn it
        from a thread that outlives it.
    """

    def __init__(
        self,
        module: str,
        *,
        env: Mapping[str, str] | None = None,
        generation: int = 0,
        fault_injection: bool = False,
        max_frame: int = MAX_FRAME,
        name: str = "host",
    ) -> None:
        self.module = module
        self.env = dict(env or {})
        self.generation = generation
        self.fault_injection = fault_injection
        self.max_frame = max_frame
        self.name = name
        self.pid: int | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._conn: Channel | None = None
        self._pidfd: int | None = None
        self._poller: select.poll | None = None
        self._ids = itertools.count(1)
        self._call_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._killed = False
        self._broken: str | None = None
        self._released = False
        #: Labels whose key was checked against the guard's pins in this session (label ->
        #: pin version): whoever runs a job on this host (its worker, or a caller's thread)
        #: checks each key once per session.
        self.checked_keys: dict[str, int] = {}
        #: When this host began to load the module (``time.monotonic()``): its connection to
        #: the device is no older. A probe's success says nothing about older connections.
        self.loaded_at = 0.0

    def __repr__(self) -> str:
        state = "alive" if self.alive else f"exited({self.exitcode})"
        return f"<HostProcess {self.name} pid={self.pid} generation={self.generation} {state}>"

    # -- life cycle ---------------------------------------------------------------------

    @classmethod
    def spawn(
        cls,
        module: str,
        *,
        env: Mapping[str, str] | None = None,
        generation: int = 0,
        fault_injection: bool = False,
        max_frame: int = MAX_FRAME,
        name: str = "host",
        start_timeout_s: float = 30.0,
    ) -> HostProcess:
        """Start a host that has loaded and initialised ``module``.

        Raises:
            HostStartError: the process did not start or did not answer ``hello``.
            ModuleLoadError: the module could not be loaded.
        """
        host = cls(
            module,
            env=env,
            generation=generation,
            fault_injection=fault_injection,
            max_frame=max_frame,
            name=name,
        )
        host._start(start_timeout_s)
        return host

    @classmethod
    def prestart(cls, *, env: Mapping[str, str] | None = None) -> HostProcess:
        """Start a spare host: the interpreter boots and imports now, in the background;
        :meth:`load` later sends ``hello`` (module, generation) and waits for it.

        Recovery then does not wait for a Python start-up (~170 ms, far more on a busy
        machine) on its critical path.
        """
        host = cls("", env=env, name="spare")
        host._launch()
        return host

    def load(
        self,
        module: str,
        *,
        generation: int = 0,
        fault_injection: bool = False,
        name: str = "host",
        start_timeout_s: float = 30.0,
    ) -> None:
        """Load ``module`` in a host from :meth:`prestart` (see :meth:`spawn` for the errors)."""
        self.module, self.generation, self.fault_injection, self.name = module, generation, fault_injection, name
        self._hello(start_timeout_s)

    def _start(self, timeout_s: float) -> None:
        self._launch()
        self._hello(timeout_s)

    def _launch(self) -> None:
        parent_sock, child_sock = socket.socketpair()
        try:
            fd = child_sock.fileno()
            self._popen = subprocess.Popen(
                host_command(fd),
                env=child_env(self.env),
                pass_fds=(fd,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,  # the module's own output: to the p11guard.host logger
                stderr=subprocess.STDOUT,
                close_fds=True,
            )
        except (OSError, ValueError, TypeError) as exc:  # ValueError: an env name or arg the OS refuses
            parent_sock.close()
            raise HostStartError(f"cannot start host process: {type(exc).__name__}: {exc}") from exc
        finally:
            child_sock.close()
        self.pid = self._popen.pid
        assert self._popen.stdout is not None
        HostOutput.shared().watch(self._popen.stdout, self)
        self._conn = Channel(parent_sock.detach())
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except OSError:
            self._pidfd = None  # very old kernel: EOF on the pipe still tells a death

    def _hello(self, timeout_s: float) -> None:
        hello = {
            "module": self.module,
            "generation": self.generation,
            "fault_injection": self.fault_injection,
            "max_frame": self.max_frame,
        }
        self.loaded_at = time.monotonic()
        try:
            self.call("hello", hello, timeout_s)
        except RemoteError:
            self.kill()
            raise
        except HostError as exc:
            self.kill()
            raise HostStartError(
                f"host did not start: {exc.message}", pid=self.pid, generation=self.generation
            ) from exc

    @property
    def alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    @property
    def exitcode(self) -> int | None:
        """Exit status once dead; negative for a signal, as in :mod:`subprocess`."""
        return None if self._popen is None else self._popen.poll()

    @property
    def signal_name(self) -> str | None:
        return _signal_name(self.exitcode)

    @property
    def broken(self) -> str | None:
        """Why this host must not be used again, or ``None`` while it is healthy."""
        return self._broken

    def kill(self) -> None:
        """SIGKILL the host and its whole process tree, then reap it. Idempotent, any thread."""
        with self._state_lock:
            self._killed = True
            self._broken = self._broken or "killed"
            popen = self._popen
            if popen is not None and popen.poll() is None:
                try:
                    tree = psutil.Process(popen.pid).children(recursive=True)
                except psutil.Error:
                    tree = []
                for child in tree:
                    try:
                        child.kill()
                    except psutil.Error:
                        pass
                try:
                    popen.kill()
                except OSError:
                    pass
            if popen is not None:
                popen.wait()
        # A thread blocked in call() wakes up on the pidfd and releases the fds itself.
        if self._call_lock.acquire(blocking=False):
            try:
                self._release()
            finally:
                self._call_lock.release()

    def close(self, deadline_s: float = 2.0) -> None:
        """Log out and close the session, let the host exit; kill it if it does not."""
        try:
            if self.alive and self._broken is None:
                self.call("close", {}, deadline_s)
                assert self._popen is not None
                self._popen.wait(timeout=deadline_s)
        except (HostError, RemoteError, subprocess.TimeoutExpired):
            pass
        finally:
            self.kill()

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._conn is not None:
            self._conn.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    # -- calls --------------------------------------------------------------------------

    def open(self, token_label: str, pin: Secret, deadline_s: float) -> dict[str, Any]:
        """Find the token, open a session and log in (once: a PIN error is never retried)."""
        result: dict[str, Any] = self.call("open", {"token_label": token_label, "pin": pin.reveal()}, deadline_s)
        self.checked_keys.clear()  # a new session: every key is checked again at its next use
        return result

    def call(self, op: str, args: Mapping[str, Any] | None = None, deadline_s: float = 20.0) -> Any:
        """Send one request and wait for its reply.

        Raises:
            RemoteError: the host answered with an error (subclass by kind).
            HostCrashed, HostTimeout, ChannelPoisoned: the host failed as a process.
        """
        reply = self._round_trip(op, args or {}, deadline_s)
        if "err" in reply:
            err = reply["err"]
            raise remote_error(err if isinstance(err, dict) else {}, op=op, pid=self.pid, generation=self.generation)
        return reply.get("ok")

    def call_batch(self, items: Sequence[tuple[str, Mapping[str, Any]]], deadline_s: float = 20.0) -> list[Any]:
        """Run many requests in one frame. Each result is a value or a :class:`RemoteError`."""
        payload = [{"op": op, "args": dict(args)} for op, args in items]
        results = self.call("batch", {"items": payload}, deadline_s)
        out: list[Any] = []
        for (op, _), item in zip(items, results, strict=True):
            if "err" in item:
                out.append(remote_error(item["err"], op=op, pid=self.pid, generation=self.generation))
            else:
                out.append(item.get("ok"))
        return out

    def send_raw(self, data: bytes, deadline_s: float = 5.0) -> dict[str, Any]:
        """Send raw bytes as one frame and wait for any reply (for tests of bad input)."""
        return self._round_trip("raw", None, deadline_s, raw=data)

    def _encode(self, rid: int, op: str, args: Mapping[str, Any]) -> bytes:
        try:
            return encode({"id": rid, "gen": self.generation, "op": op, "args": dict(args)}, self.max_frame)
        except FrameError as exc:
            why, name = str(exc), "frame_too_large"
        except (TypeError, ValueError, OverflowError) as exc:
            why, name = f"cannot encode arguments: {exc}", "bad_request"
        raise RequestError(why, kind="bad_request", name=name, op=op, pid=self.pid, generation=self.generation)

    def _round_trip(
        self, op: str, args: Mapping[str, Any] | None, deadline_s: float, raw: bytes | None = None
    ) -> dict[str, Any]:
        with self._call_lock:
            if self._broken is not None:
                raise HostError(f"host is not usable ({self._broken})", pid=self.pid, generation=self.generation, op=op)
            rid = next(self._ids)
            frame = raw if raw is not None else self._encode(rid, op, args or {})
            assert self._conn is not None
            try:
                self._conn.send(frame)
                return self._wait_reply(None if raw is not None else rid, op, deadline_s)
            except OSError as exc:
                # Broken pipe: the host is gone; report how it died.
                raise self._death(op, exc) from exc
            finally:
                if self._killed:
                    self._release()

    def _wait_reply(self, rid: int | None, op: str, deadline_s: float) -> dict[str, Any]:
        assert self._conn is not None
        end = time.monotonic() + deadline_s
        conn_fd = self._conn.fileno()
        if self._poller is None:
            # One poll object per host, made once: wait() would build a selector per call.
            self._poller = select.poll()
            self._poller.register(conn_fd, select.POLLIN)
            if self._pidfd is not None:
                self._poller.register(self._pidfd, select.POLLIN)
        while True:
            remaining = end - time.monotonic()
            if remaining <= 0:
                self._broken = f"call {op!r} passed its deadline of {deadline_s:g} s"
                err = HostTimeout(
                    f"{op} did not answer within {deadline_s:g} s: host hung",
                    pid=self.pid,
                    generation=self.generation,
                    op=op,
                )
                err.deadline_s = deadline_s
                raise err
            events = self._poller.poll(max(1, math.ceil(remaining * 1000)))
            ready = {fd for fd, _ in events}
            if conn_fd in ready:
                try:
                    data = self._conn.recv(self.max_frame)
                except (EOFError, OSError) as exc:  # closed or reset: the host died
                    raise self._death(op, exc) from exc
                except FrameError as exc:  # oversized frame
                    raise self._poison(op, f"unreadable frame from host ({exc})") from exc
                try:
                    reply = decode(data)
                except FrameError as exc:
                    raise self._poison(op, str(exc)) from exc
                if rid is not None and reply.get("id") != rid:
                    raise self._poison(op, f"reply id {reply.get('id')!r} does not match {rid}")
                return reply
            if ready:  # only the pidfd: the process exited
                raise self._death(op, None)

    def _poison(self, op: str, why: str) -> ChannelPoisoned:
        self._broken = f"channel poisoned: {why}"
        err = ChannelPoisoned(f"channel poisoned: {why}", pid=self.pid, generation=self.generation, op=op)
        self.kill()
        return err

    def _death(self, op: str, cause: BaseException | None) -> HostCrashed:
        self._broken = self._broken or "dead"
        assert self._popen is not None
        try:
            code: int | None = self._popen.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            code = None  # pipe closed but process lingers: finish it
        if code is None:
            self.kill()
            code = self._popen.poll()
        sig = _signal_name(code)
        how = f"killed by {sig}" if sig else f"exited with code {code}"
        planned = " (killed by p11guard)" if self._killed else ""
        err = HostCrashed(f"host {how} during {op}{planned}", pid=self.pid, generation=self.generation, op=op)
        err.exitcode, err.signal_name = code, sig
        return err
