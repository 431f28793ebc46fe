"""Memory of a process tree, sampled: RSS and PSS summed over a process and all its descendants.

Shared by the benchmarks (``large_mosaic.py``, ``compare.py``). :class:`Sampler` polls a root
process and every descendant (``children(recursive=True)``) every ``interval`` seconds (or less
often, so that sampling takes at most 2 % of a core from the run it measures), plus any
Ray process working in the run's Ray session folder that has left the tree (re-parented to init);
processes of other Ray clusters on the machine are not counted. RSS-sum counts every shared page
(torch's and Ray's libraries, Ray's shared-memory object store) once per process that maps it, so
it over-counts; PSS-sum divides shared pages among the processes that share them and is the honest
total.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

__all__ = ["MB", "Sample", "Sampler", "breakdown", "describe", "leftover_ray"]

MB = 10**6


def describe(proc: psutil.Process) -> str:
    """A short, readable name: 'ray::Predictor', 'raylet', 'gcs_server', 'python -m tilewise'."""
    try:
        cmd = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "?"
    if not cmd:
        return proc.name() if proc.is_running() else "?"
    if cmd[0].startswith("ray::"):
        return cmd[0].split()[0]
    exe = os.path.basename(cmd[0])
    if exe.startswith("python"):
        for i, arg in enumerate(cmd[1:], 1):
            if arg == "-m" and i + 1 < len(cmd):
                return f"python -m {cmd[i + 1]}"
            if not arg.startswith("-"):
                return f"python {os.path.basename(arg)}"
    return exe


_SESSION = re.compile(r"/tmp/ray/session_[^/\s=]+")


def _session_of(proc: psutil.Process) -> str | None:
    """The Ray session folder a process works in (from its command line or open log files)."""
    try:
        texts = [" ".join(proc.cmdline())] + [f.path for f in proc.open_files()]
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    for text in texts:
        match = _SESSION.search(text)
        if match:
            return match.group(0)
    return None


def _looks_like_ray(cmdline: list[str]) -> bool:
    text = " ".join(cmdline)
    return text.startswith("ray::") or "/site-packages/ray/" in text


def memory_of(proc: psutil.Process) -> tuple[int, int, int]:
    """RSS, PSS and USS of a process in bytes.

    From ``/proc/PID/smaps_rollup`` (Linux >= 4.14), which the kernel sums for us: psutil's
    ``memory_full_info`` parses the whole ``smaps``, about 3 ms per process, and sampling Ray's
    ten processes every 0.2 s that way took 7 % of this 2-core machine from the run measured.
    """
    try:
        with open(f"/proc/{proc.pid}/smaps_rollup", "rb") as f:
            text = f.read()
    except FileNotFoundError:
        raise psutil.NoSuchProcess(proc.pid) from None
    except PermissionError:
        raise psutil.AccessDenied(proc.pid) from None
    except OSError:  # no smaps_rollup (old kernel): the slow way
        full = proc.memory_full_info()
        return full.rss, getattr(full, "pss", full.rss), full.uss
    kb: dict[bytes, int] = {}
    for line in text.splitlines()[1:]:
        key, _, rest = line.partition(b":")
        kb[key] = int(rest.split()[0])
    uss = kb.get(b"Private_Clean", 0) + kb.get(b"Private_Dirty", 0)
    return kb.get(b"Rss", 0) * 1024, kb.get(b"Pss", 0) * 1024, uss * 1024


# The sampler may spend one second in this many on sampling (see Sampler._loop).
SAMPLING_SHARE = 50


@dataclass
class Sample:
    t: float
    rss: int
    pss: int
    procs: list[dict[str, Any]]


@dataclass
class Sampler:
    """Polls the process tree of ``root`` (plus escaped Ray processes) every ``interval`` s."""

    root: psutil.Process
    started: float  # time.time() when the run began; older processes are never counted
    interval: float = 0.2
    # time.time() when the command measured began, when ``started`` is earlier (a Ray head
    # started before it): CPU time spent before this is left out of cpu_seconds
    run_started: float = 0.0
    samples: int = 0
    peak_rss: Sample | None = None
    peak_pss: Sample | None = None
    max_single: dict[str, Any] = field(default_factory=dict)
    max_procs: int = 0
    escaped: dict[int, str] = field(default_factory=dict)
    seen: dict[int, dict[str, Any]] = field(default_factory=dict)
    sessions: set[str] = field(default_factory=set)
    max_per_name: dict[str, int] = field(default_factory=dict)
    # [s into the run, RSS sum MB, PSS sum MB, processes, largest single-process RSS MB]
    timeline: list[list[float]] = field(default_factory=list)
    pss_errors: int = 0
    # Peaks and samples are taken only while this returns True (None = always): a benchmark can
    # stop measuring once the method under test has finished and only bookkeeping remains.
    active: Callable[[], bool] | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds (user + system) of every process seen, as of its last sample.

        Less sensitive than wall time to other work on a shared machine. Time a process spends
        after its last sample (at most one interval) is not counted.
        """
        return sum(e["cpu_s"] - e["cpu_before_s"] for e in self.seen.values())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            t = time.perf_counter()
            self.sample()
            cost = time.perf_counter() - t
            # PSS costs the kernel a page-table walk per process (about 2.5 ms for each of
            # Ray's ten processes): every 0.2 s that took 12 % of one of the 2 cores away
            # from the run measured, and from multi-process runs only. At most 2 % of a core.
            self._stop.wait(max(self.interval, SAMPLING_SHARE * cost) - cost)

    def _members(self) -> list[tuple[psutil.Process, bool]]:
        try:
            tree = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        pids = {p.pid for p in tree} | {os.getpid()}
        members = [(p, True) for p in tree]
        if not self.sessions:  # the embedded Ray's session folder, once its processes exist
            for proc in tree:
                session = _session_of(proc)
                if session:
                    self.sessions.add(session)
                    break
        # Ray processes of this run's session that left the tree (re-parented to init after
        # their parent exited). Other Ray clusters on the machine (other users' tests) are not
        # counted: a candidate must work in this run's session folder.
        for p in psutil.process_iter(["pid", "cmdline", "create_time"]):
            info = p.info
            if info["pid"] in pids or not info["cmdline"] or info["create_time"] is None:
                continue
            if info["create_time"] + 1.0 < self.started or not _looks_like_ray(info["cmdline"]):
                continue
            if p.pid in self.escaped or _session_of(p) in self.sessions:
                members.append((p, False))
        return members

    def sample(self) -> None:
        if self.active is not None and not self.active():
            return
        procs: list[dict[str, Any]] = []
        for proc, in_tree in self._members():
            try:
                with proc.oneshot():
                    try:
                        rss, pss, uss = memory_of(proc)
                    except psutil.AccessDenied:
                        self.pss_errors += 1
                        rss = pss = uss = proc.memory_info().rss
                    name = describe(proc)
                    ppid = proc.ppid()
                    times = proc.cpu_times()
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
            procs.append(
                {
                    "pid": proc.pid,
                    "ppid": ppid,
                    "name": name,
                    "rss": rss,
                    "pss": pss,
                    "uss": uss,
                    "in_tree": in_tree,
                }
            )
            self.max_per_name[name] = max(self.max_per_name.get(name, 0), pss)
            entry = self.seen.get(proc.pid)
            if entry is None:
                # CPU a process had spent before the run (a Ray head's daemons, started
                # earlier) is not the run's: counted from its first sample on
                before = proc.create_time() + 1.0 < self.run_started
                entry = self.seen[proc.pid] = {
                    "names": [],
                    "ppid": ppid,
                    "in_tree": in_tree,
                    "max_rss_mb": 0.0,
                    "max_pss_mb": 0.0,
                    "cpu_s": 0.0,
                    "cpu_before_s": round(times.user + times.system, 2) if before else 0.0,
                }
            # Ray workers rename themselves (ray::IDLE -> ray::Predictor...).
            if name != "?" and name not in entry["names"]:
                entry["names"].append(name)
            entry["max_rss_mb"] = max(entry["max_rss_mb"], round(rss / MB, 1))
            entry["max_pss_mb"] = max(entry["max_pss_mb"], round(pss / MB, 1))
            # cumulative since the process started; its own threads, not its children's
            entry["cpu_s"] = max(entry["cpu_s"], round(times.user + times.system, 2))
            if not in_tree:
                self.escaped.setdefault(proc.pid, name)
            if rss > self.max_single.get("rss", -1):
                self.max_single = {"pid": proc.pid, "name": name, "rss": rss, "pss": pss}
        if not procs:
            return
        self.samples += 1
        self.max_procs = max(self.max_procs, len(procs))
        s = Sample(
            time.perf_counter(), sum(p["rss"] for p in procs), sum(p["pss"] for p in procs), procs
        )
        self.timeline.append(
            [
                round(time.time() - self.started, 1),
                round(s.rss / MB, 1),
                round(s.pss / MB, 1),
                len(procs),
                round(max(p["rss"] for p in procs) / MB, 1),
            ]
        )
        if self.peak_rss is None or s.rss > self.peak_rss.rss:
            self.peak_rss = s
        if self.peak_pss is None or s.pss > self.peak_pss.pss:
            self.peak_pss = s


def leftover_ray(started: float, sessions: set[str]) -> list[str]:
    """Ray processes of the run's session that are still alive after it exited."""
    left = []
    for p in psutil.process_iter(["pid", "cmdline", "create_time"]):
        info = p.info
        if (
            info["cmdline"]
            and info["create_time"]
            and info["create_time"] + 1.0 >= started
            and info["pid"] != os.getpid()
            and _looks_like_ray(info["cmdline"])
            and _session_of(p) in sessions
        ):
            left.append(f"{info['pid']} {describe(p)}")
    return left


def breakdown(sample: Sample | None) -> list[dict[str, Any]]:
    """The processes of one sample, largest PSS first, in MB (for reports)."""
    if sample is None:
        return []
    rows = sorted(sample.procs, key=lambda p: -p["pss"])
    return [
        {
            "pid": p["pid"],
            "ppid": p["ppid"],
            "name": p["name"],
            "rss_mb": round(p["rss"] / MB, 1),
            "pss_mb": round(p["pss"] / MB, 1),
            "uss_mb": round(p["uss"] / MB, 1),
            "in_tree": p["in_tree"],
        }
        for p in rows
    ]
