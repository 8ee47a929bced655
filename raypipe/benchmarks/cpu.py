"""Where the CPU time of a Ray Data stage goes on this node: the data workers' own work, the
time they were ready to run but waited for a CPU, and what this driver and Ray's own processes
used.

``ingest`` reports it next to its images/s, so that a ratio below the target says why: on a
machine whose cores are all given to the data stage, Ray's driver (its streaming executor and
batch iterator), raylet, GCS and Ray Data's helper actors take CPU from the data tasks, where a
DataLoader's workers have the cores to themselves.

Processes are told apart by the titles Ray gives them (``ray::IDLE``, ``ray::MapBatches(...)``,
``ray::EpochClock``, ...). They are this node's only (a multi-node cluster's other nodes are not
seen): the descendants of this process when it started Ray, else every process of the node.
They are read from ``/proc`` through psutil; the wait for a CPU needs Linux's per-thread
``schedstat`` (None elsewhere). A sampling thread keeps each process's last reading, so a
process that exits inside the measured span still counts up to its last sample, and looks at the
titles again: a worker taken for a lane that Ray then gives a helper actor (the run's bad-file
ledger or epoch clock, created inside the span) counts as Ray's own from that sample on.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import threading
import time
from pathlib import Path

import psutil

# Ray worker processes that run the data stage's work: task workers, idle or running one of the
# stage's tasks (the row ids, the map, the cache's decode pass); the other ``ray::`` processes
# are helper actors
LANE_TITLES = ("ray::IDLE", "ray::MapBatches", "ray::ReadRange", "ray::_prepare_part")
SYSTEM_NAMES = ("raylet", "gcs_server")
SYSTEM_TITLES = ("ray::", "ray-dashboard-")
# a Ray worker process that has not taken its ``ray::`` title yet: lane or helper actor, unknown
WORKER_SCRIPT = "default_worker.py"
# an actor's title: its class (CamelCase by convention), alone or with the method it runs. Ray may
# start an actor in an idle pooled worker (``ray::IDLE``, taken for a lane until then)
ACTOR_TITLE = re.compile(r"ray::_?[A-Z]\w*(\.\w+)?$")


@functools.cache
def ray_package() -> str:
    """The folder of the installed ``ray`` package, with a trailing separator: Ray's own Python
    processes (dashboard, log monitor, autoscaler monitor, workers) run scripts from it."""
    spec = importlib.util.find_spec("ray")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return os.path.join(locations[0], "") if locations else "\0"  # no ray: matches nothing


def role_of(cmdline: list[str], name: str) -> str | None:
    """``lane``, ``system`` (Ray's processes and helper actors) or None (not Ray's), from a
    process's command line as Ray sets it (its title) and its name. None also for a Ray worker
    process caught before it takes its title, so that it is looked at again."""
    title = " ".join(cmdline)
    if title.startswith(LANE_TITLES):
        return "lane"
    scripts = [a for a in cmdline if a.startswith(ray_package())]
    if any(a.endswith(WORKER_SCRIPT) for a in scripts):
        return None
    if title.startswith(SYSTEM_TITLES) or name in SYSTEM_NAMES or scripts:
        return "system"
    return None


def became_actor(cmdline: list[str]) -> bool:
    """Whether a process taken for a lane now runs a helper actor (its title names a class)."""
    title = " ".join(cmdline).strip()  # a title Ray sets pads the command line with empty args
    return not title.startswith(LANE_TITLES) and ACTOR_TITLE.match(title) is not None


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except (psutil.Error, OSError):  # gone
        return ""


LINUX_TASKS = Path("/proc/self/task").is_dir()  # a thread's wait for a CPU can be read


def cpu_wait_s(pid: int) -> float | None:
    """Seconds the live threads of ``pid`` were runnable but waited for a CPU (Linux); None
    where its threads cannot be listed (not Linux, or the process has gone). A thread that ends
    between the listing and its reading is left out."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return None
    total = 0
    for task in tasks:
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


class StageCpu:
    """``with StageCpu(cpus):`` accumulates, over one or more spans, the wall time and the CPU
    seconds of this node's processes by role (see :func:`role_of`; ``driver`` is this process).
    ``cpus``: the CPUs of the data stage. :meth:`summary` gives fractions of those.
    ``descendants``: see :meth:`_candidates`."""

    def __init__(self, cpus: float, interval: float = 0.5, descendants: bool | None = None):
        self.cpus, self.interval, self.descendants = cpus, interval, descendants
        self.wall = 0.0
        self.cpu = {"lane": 0.0, "driver": 0.0, "system": 0.0}
        self.lane_wait: float | None = 0.0
        self._procs: dict[int, tuple[str, psutil.Process]] = {}
        self._first: dict[int, tuple[float, float | None]] = {}
        self._last: dict[int, tuple[float, float | None]] = {}

    def _scan(self) -> None:
        """Classify processes not classified yet (a new one counts from its start). Those not
        Ray's are looked at again each time: a Ray worker process takes its ``ray::`` title only
        after it has started."""
        for pid in self._candidates():
            if pid in self._procs:
                continue
            try:
                p = psutil.Process(pid)
                role = "driver" if pid == os.getpid() else role_of(p.cmdline(), p.name())
            except (psutil.Error, OSError):
                continue
            if role is not None:
                self._procs[pid] = (role, p)

    def _candidates(self) -> list[int]:
        """This process and its descendants (``descendants``; None: when this process started
        Ray, its raylet being one of them), so that other Ray sessions on a shared machine are
        not counted as this stage's. Else every process of the node."""
        family = psutil.Process(os.getpid()).children(recursive=True)
        mine = self.descendants
        if mine is None:
            mine = any(_name(p) == "raylet" for p in family)
        return [os.getpid(), *(p.pid for p in family)] if mine else psutil.pids()

    def _read(self, first: bool = False) -> None:
        for pid, (role, p) in list(self._procs.items()):
            try:
                if role == "lane" and pid in self._last and not first and became_actor(p.cmdline()):
                    # its lane time ends at the last sample; from there it counts as Ray's own
                    self._close(pid)
                    role = "system"
                    self._procs[pid] = (role, p)
                    self._first[pid] = (self._last[pid][0], None)
                t = p.cpu_times()
            except (psutil.Error, OSError):
                continue  # exited: keeps its last reading
            reading = (t.user + t.system, cpu_wait_s(pid) if role == "lane" else None)
            if role == "lane" and reading[1] is None and LINUX_TASKS:
                continue  # exited between the two readings: keeps its last reading
            if first:
                self._first[pid] = reading
            self._last[pid] = reading

    def _close(self, pid: int) -> None:
        """Add ``pid``'s CPU (and a lane's wait) from its first to its last reading to its
        role's totals."""
        if pid not in self._last:
            return
        role = self._procs[pid][0]
        (cpu, wait), (cpu0, wait0) = self._last[pid], self._first.get(pid, (0.0, 0.0))
        self.cpu[role] += max(0.0, cpu - cpu0)
        if role == "lane":  # None once any lane's wait cannot be read
            self.lane_wait = None if None in (wait, wait0, self.lane_wait) else \
                self.lane_wait + max(0.0, wait - wait0)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._scan()
            self._read()

    def __enter__(self) -> StageCpu:
        self._procs, self._first, self._last = {}, {}, {}
        self._scan()
        self._read(first=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="StageCpu")
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.wall += time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self._scan()
        self._read()
        for pid in self._procs:
            self._close(pid)

    def summary(self) -> dict:
        """Fractions of the stage's CPUs over the measured wall time: ``lane_busy`` (the lanes
        computing), ``lane_cpu_wait`` (ready, waiting for a CPU), ``lane_idle`` (the rest: no
        task to run: start-up, gaps between tasks, the end of an epoch); and the cores this
        driver and Ray's own processes used on average."""
        span = max(self.wall * self.cpus, 1e-9)
        busy = self.cpu["lane"] / span
        wait = None if self.lane_wait is None else self.lane_wait / span
        return {
            "lane_busy": busy, "lane_cpu_wait": wait,
            "lane_idle": max(0.0, 1.0 - busy - (wait or 0.0)),
            "driver_cores": self.cpu["driver"] / max(self.wall, 1e-9),
            "ray_system_cores": self.cpu["system"] / max(self.wall, 1e-9),
            "wall_s": self.wall,
        }
