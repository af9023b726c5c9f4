"""The chaos suite's harness: figures, worker processes, the probe tasks record in.

The chaos scenarios (``tests/chaos/scenarios.py``, run short by pytest and long by
``benchmarks/chaos.py``) start real ``celery worker`` processes against private
redis-servers and hurt them: SIGKILL of pool children holding slots, a broker or fleet
Redis stopped, restarted empty, frozen (SIGSTOP) or slowed (``DEBUG SLEEP``). What they
measure goes into a :class:`Figures` row: faults injected, tasks, executions, leaks, 429s
and the named checks that make the scenario pass or fail. The injectors are in
:mod:`celery_fleet.testing.faults`.

Example::

    with ChaosWorkers("tests.chaos.chaos_app", env) as workers:
        killer = Killer(probe, workers).start(kills=50, every_s=0.2)
        ...
        killer.stop()
        fig = Figures("storm", faults=killer.kills)
        fig.check("cap never exceeded", probe.most() <= 4)
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import redis

__all__ = [
    "ChaosWorkers",
    "Figures",
    "Probe",
    "format_table",
    "wait_progress",
    "wait_until",
]

# KEYS: inside set, max counter key; ARGV: pid. Enters the guarded section, returns how many
# are inside now and keeps the highest count seen.
_ENTER = """
redis.call('SADD', KEYS[1], ARGV[1])
local n = redis.call('SCARD', KEYS[1])
local top = tonumber(redis.call('GET', KEYS[2]) or '0')
if n > top then redis.call('SET', KEYS[2], n) end
return n
"""
# KEYS: inside set, doomed set, done hash; ARGV: pid, field. Leaves and counts a completion,
# unless the killer has already chosen this pid (0: wait for the SIGKILL, count nothing).
_LEAVE = """
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return 0 end
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
return 1
"""
# KEYS: inside set, doomed set; ARGV: pid. The killer's claim: only a pid still inside
# (holding its slot and key, completion not yet counted) may be killed.
_DOOM = """
if redis.call('SREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('SADD', KEYS[2], ARGV[1])
  return 1
end
return 0
"""


@dataclasses.dataclass
class Figures:
    """One scenario's outcome: the table row and the checks that decide pass or fail."""

    scenario: str
    params: str = ""
    faults: int = 0
    tasks: int = 0
    executions: int = 0
    leaks: int = 0
    http_429: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    checks: list[tuple[str, bool, str]] = dataclasses.field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        """Record a named check (``ok`` False fails the scenario); returns ``ok``."""
        self.checks.append((name, bool(ok), detail))
        return bool(ok)

    @property
    def passed(self) -> bool:
        return all(ok for _, ok, _ in self.checks)

    @property
    def failures(self) -> list[str]:
        return [f"{name}: {detail}" for name, ok, detail in self.checks if not ok]

    def report(self) -> str:
        """The row and every check, as pytest prints it (``-s``) and the benchmark logs it."""
        lines = [format_table([self])]
        for name, ok, detail in self.checks:
            lines.append(
                f"  [{'ok' if ok else 'FAIL'}] {name}" + (f" ({detail})" if detail else "")
            )
        if self.extra:
            lines.append("  " + ", ".join(f"{k}={v}" for k, v in self.extra.items()))
        return "\n".join(lines)


def format_table(rows: list[Figures]) -> str:
    """A Markdown table of scenarios: faults, tasks, executions, leaks, 429s, pass/fail."""
    head = "| scenario | parameters | faults | tasks | executions | leaks | 429s | s | result |"
    out = [head, "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for f in rows:
        result = "pass" if f.passed else "FAIL: " + "; ".join(f.failures)
        out.append(
            f"| {f.scenario} | {f.params} | {f.faults} | {f.tasks} | {f.executions} | "
            f"{f.leaks} | {f.http_429} | {f.seconds:.0f} | {result} |"
        )
    return "\n".join(out)


def wait_until(predicate: Callable[[], bool], timeout_s: float, every_s: float = 0.1) -> bool:
    """Poll ``predicate`` until it is true or ``timeout_s`` passed; its last answer."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every_s)
    return bool(predicate())


def wait_progress(
    count: Callable[[], int], target: int, stall_s: float, timeout_s: float, every_s: float = 0.5
) -> bool:
    """Wait until ``count()`` reaches ``target``; give up after ``timeout_s``, or earlier when
    it has not moved for ``stall_s`` (a stuck task never completes: no need to wait more)."""
    deadline = time.monotonic() + timeout_s
    last, moved = count(), time.monotonic()
    while last < target and time.monotonic() < deadline:
        time.sleep(every_s)
        now = count()
        if now != last:
            last, moved = now, time.monotonic()
        elif time.monotonic() - moved > stall_s:
            break
    return last >= target


class Probe:
    """What tasks record, in a Redis of its own (never the fleet's, which scenarios break).

    ``enter``/``leave`` bracket a guarded section so an independent set counts holders
    (the cap check) and a hash counts completions per key (the exactly-once check);
    ``doom`` is the killer's side of the same protocol.
    """

    def __init__(self, url: str, namespace: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.ns = namespace
        self._enter = self.client.register_script(_ENTER)
        self._leave = self.client.register_script(_LEAVE)
        self._doom = self.client.register_script(_DOOM)

    def key(self, name: str) -> str:
        return f"chaos:{self.ns}:{name}"

    def enter(self, section: str = "inside") -> int:
        keys = [self.key(section), self.key(f"max:{section}")]
        return int(self._enter(keys=keys, args=[os.getpid()]))

    def leave(self, field: str, section: str = "inside") -> bool:
        keys = [self.key(section), self.key("doomed"), self.key("done")]
        return bool(self._leave(keys=keys, args=[os.getpid(), field]))

    def out(self, section: str = "inside") -> None:
        """Leave without counting a completion (the body raised)."""
        self.client.srem(self.key(section), os.getpid())

    def doom(self, pid: int) -> bool:
        keys = [self.key("inside"), self.key("doomed")]
        return bool(self._doom(keys=keys, args=[pid]))

    def most(self, section: str = "inside") -> int:
        return int(self.client.get(self.key(f"max:{section}")) or 0)

    def done(self) -> dict[str, int]:
        raw = self.client.hgetall(self.key("done"))
        return {k.decode() if isinstance(k, bytes) else k: int(v) for k, v in raw.items()}

    def close(self) -> None:
        self.client.close()


class ChaosWorkers:
    """``workers`` real ``celery worker`` processes (prefork, ``concurrency`` children each)
    for ``app_module``, configured through ``env``; stopped by pid on exit.

    ``children()`` lists their pool processes (the only processes a :class:`Killer` may
    signal); the log goes to ``log_path`` (kept when a worker exited badly).
    """

    def __init__(
        self,
        app_module: str,
        env: Mapping[str, str],
        workers: int = 1,
        concurrency: int = 4,
        root: Path | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.app_module = app_module
        self.env = dict(env)
        self.workers = workers
        self.concurrency = concurrency
        self.root = root or Path(__file__).resolve().parents[2]
        self.extra_args = extra_args
        self.procs: list[subprocess.Popen[bytes]] = []
        self.restarts = 0
        self._log: Any = None

    def start(self) -> ChaosWorkers:
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in stop()
            prefix="chaos-worker-", suffix=".log", delete=False
        )
        self.procs = [self._spawn(k) for k in range(self.workers)]
        return self

    def _spawn(self, k: int) -> subprocess.Popen[bytes]:
        env = {**os.environ, **self.env, "PYTHONPATH": str(self.root)}
        tag = self.env.get("CHAOS_NS", "chaos")
        return subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", self.app_module, "worker"),
                *("-P", "prefork", "-c", str(self.concurrency), "-n", f"{tag}-{k}@%h"),
                *("--without-gossip", "--without-mingle", "--without-heartbeat"),
                *("-l", "INFO", *self.extra_args),
            ],
            cwd=self.root,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def revive(self) -> int:
        """Start again every worker that exited, as a supervisor (systemd, Kubernetes)
        would; returns how many. Counted in :attr:`restarts`."""
        revived = 0
        for k, proc in enumerate(self.procs):
            if proc.poll() is not None:
                self.procs[k] = self._spawn(k)
                revived += 1
        self.restarts += revived
        return revived

    def children(self) -> set[int]:
        """Pids of the pool processes of the workers started here (live ones)."""
        pids: set[int] = set()
        for proc in self.procs:
            pids.update(_children(proc.pid))
        return pids

    def wait_ready(self, timeout_s: float = 60.0) -> bool:
        """True once every worker has its full pool and logged ``ready``."""

        def ready() -> bool:
            text = Path(self._log.name).read_text(errors="replace")
            return text.count(" ready.") >= self.workers and len(self.children()) >= (
                self.workers * self.concurrency
            )

        return wait_until(ready, timeout_s, 0.2)

    def log_text(self) -> str:
        return Path(self._log.name).read_text(errors="replace") if self._log else ""

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                for pid in self._descendants(proc):
                    kill_quietly(pid)
                proc.kill()
                proc.wait()
        clean = not self.restarts and all(
            p.returncode in (0, -signal.SIGTERM, -signal.SIGKILL) for p in self.procs
        )
        if self._log is not None:
            self._log.close()
            if clean and not os.environ.get("CHAOS_KEEP_LOGS"):
                os.unlink(self._log.name)
            self._log = None

    @staticmethod
    def _descendants(proc: subprocess.Popen[bytes]) -> list[int]:
        found, todo = [], [proc.pid]
        while todo:
            kids = _children(todo.pop())
            found += kids
            todo += kids
        return found

    def __enter__(self) -> ChaosWorkers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux ``/proc``; the chaos suite signals processes)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def kill_quietly(pid: int) -> None:
    """SIGKILL ``pid``; gone already is fine."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
