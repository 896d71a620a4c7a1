#!/usr/bin/env python3
"""Fault-tolerance benchmark for ftvm (driven by scripts/bench-ft.sh).

Runs witness/backup/primary/console processes on this machine and measures:
  1. failover time (kill -9 of the primary -> first byte from the new primary),
     plus lost/duplicated console lines;
  2. the latency the output rule adds to console output (FT primary with a
     live backup vs an FT primary alone in its view), with an `ftvm console`
     whose every output line is timestamped on arrival;
  3. backup lag (exits), polled with `ftvm status` every 100 ms;
  4. guest progress under FT vs a plain `ftvm run` (work-bound workload);
  5. log bandwidth of a timer-paced run.

Python 3 standard library only. Every process started here is recorded in
a pid file (for the shell wrapper) and killed on exit, Ctrl-C included.
Every FT connection is authenticated and encrypted with the cluster key
(--key, made by the wrapper with `ftvm keygen`), so this script never speaks
the FT protocols itself: it runs `ftvm status` and `ftvm console`.
"""

import argparse
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

# --------------------------------------------------------------------------
# small utilities


def now_ms():
    return time.time() * 1000.0


def pct(xs, p):
    """Percentile with linear interpolation between closest ranks."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return float(xs[0])
    k = (len(xs) - 1) * p / 100.0
    lo = math.floor(k)
    hi = math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(xs):
    return pct(xs, 50)


def fmt(x, nd=1):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{nd}f}"


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


class PortInUse(BenchError):
    pass


# --------------------------------------------------------------------------
# processes


class Proc:
    """A child process; stderr (optionally stdout) lines are timestamped."""

    def __init__(self, reg, name, argv, stdout_path=None, stderr_path=None, capture_stdout=False):
        self.name = name
        self.argv = argv
        self.err_lines = []  # (unix_ms, line)
        self.out_lines = []
        self._lock = threading.Lock()
        out = subprocess.PIPE if capture_stdout else (open(stdout_path, "wb") if stdout_path else subprocess.DEVNULL)
        self.t_spawn_ms = now_ms()
        self.t_spawn_mono = time.monotonic()
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.PIPE)
        if stdout_path and not capture_stdout:
            out.close()
        self.t_exit_mono = None
        self.t_exit_ms = None
        reg.add(self)
        self._errf = open(stderr_path, "w") if stderr_path else None
        self._threads = [threading.Thread(target=self._pump, args=(self.p.stderr, self.err_lines, self._errf), daemon=True)]
        if capture_stdout:
            self._threads.append(threading.Thread(target=self._pump, args=(self.p.stdout, self.out_lines, None), daemon=True))
        self._threads.append(threading.Thread(target=self._reap, daemon=True))
        for t in self._threads:
            t.start()

    def _pump(self, f, dst, copy):
        for raw in iter(f.readline, b""):
            t = now_ms()
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._lock:
                dst.append((t, line))
            if copy:
                copy.write(line + "\n")
                copy.flush()
        f.close()

    def _reap(self):
        self.p.wait()
        self.t_exit_mono = time.monotonic()
        self.t_exit_ms = now_ms()

    @property
    def pid(self):
        return self.p.pid

    def alive(self):
        return self.p.poll() is None

    def wait(self, timeout):
        try:
            self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        # let the reader threads see EOF
        for t in self._threads:
            t.join(timeout=2)
        if self._errf:
            self._errf.flush()
        return self.p.returncode

    def kill(self, sig=signal.SIGKILL):
        if self.p.poll() is None:
            try:
                os.kill(self.p.pid, sig)
            except ProcessLookupError:
                pass

    def err_text(self):
        with self._lock:
            return "\n".join(l for _, l in self.err_lines)

    def find_err(self, pattern):
        """(unix_ms, match) of the first stderr line matching pattern."""
        rx = re.compile(pattern)
        with self._lock:
            for t, l in self.err_lines:
                m = rx.search(l)
                if m:
                    return t, m
        return None, None


class Registry:
    def __init__(self, pidfile):
        self.procs = []
        self.pidfile = pidfile

    def add(self, proc):
        self.procs.append(proc)
        if self.pidfile:
            with open(self.pidfile, "a") as f:
                f.write(f"{proc.pid}\n")

    def kill_all(self):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            try:
                p.p.wait(timeout=5)
            except Exception:
                pass
        self.procs = [p for p in self.procs if p.alive()]

    def stop(self, procs):
        for p in procs:
            p.kill()
        for p in procs:
            p.wait(5)
        self.procs = [p for p in self.procs if p.alive()]


_used_ports = set()


def free_port():
    for _ in range(100):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        if port not in _used_ports:
            _used_ports.add(port)
            return port
    raise BenchError("no free port")


def wait_listening(port, proc, timeout=5.0):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if not proc.alive():
            raise_port_or(proc, f"{proc.name} exited early")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.005)
    raise BenchError(f"{proc.name} did not listen on port {port} within {timeout}s")


def raise_port_or(proc, msg):
    proc.wait(2)
    text = proc.err_text()
    if "port is in use" in text:
        raise PortInUse(text)
    raise BenchError(f"{msg}: {text[-800:]}")


STATUS_RE = {
    "view": re.compile(r"^view: (\d+)$", re.M),
    # Members are ADDR@ID; the bench names roles by address.
    "primary": re.compile(r"^primary: ([^@\s]+)\S*$", re.M),
    "backup": re.compile(r"^backup: ([^@\s]+)\S*(?: \((alive|silent)[,)].*)?$", re.M),
    "log": re.compile(r"^log: primary at exit #(\d+), backup acknowledged #(\d+)", re.M),
}


def witness_status(ftvm, key, waddr, timeout=2.0):
    """The witness's view through `ftvm status`, as a dict like the
    witness's own status reply (view, primary, backup, sent, acked,
    backup_alive; "-" for none)."""
    r = subprocess.run([ftvm, "status", "--witness", waddr, "--key", key], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise BenchError(f"ftvm status: {r.stderr.strip()[-300:]}")
    m = {k: rx.search(r.stdout) for k, rx in STATUS_RE.items()}
    if not all(m.values()):
        raise BenchError(f"ftvm status said: {r.stdout!r}")
    none = lambda v: "-" if v == "none" else v
    return {"view": m["view"].group(1), "primary": none(m["primary"].group(1)), "backup": none(m["backup"].group(1)),
            "backup_alive": "1" if m["backup"].group(2) == "alive" else "0",
            "sent": m["log"].group(1), "acked": m["log"].group(2)}


def wait_until(pred, timeout, what, step=0.01):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        try:
            if pred():
                return
        except (OSError, BenchError):
            pass
        time.sleep(step)
    raise BenchError(f"timed out waiting for {what}")


# --------------------------------------------------------------------------
# status poller (backup lag) and our own console client


STATUS_LOG_RE = re.compile(r"log: primary at exit #(\d+), backup acknowledged #(\d+) \(lag (\d+) exits\)")


class ForeignLoad:
    """Samples /proc every 0.5 s: how many CPUs processes that are not ours
    (not this helper or its descendants) keep busy. Timings on a small host
    mean little while something else runs."""

    def __init__(self):
        self.hz = os.sysconf("SC_CLK_TCK")
        self.me = os.getpid()
        self.samples = []  # (monotonic, foreign CPUs busy since the last sample)
        self.top = {}  # comm -> CPU-seconds
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _snap(self):
        procs = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    st = f.read()
            except OSError:
                continue
            r = st.rfind(")")
            comm = st[st.find("(") + 1:r]
            f_ = st[r + 2:].split()
            procs[int(d)] = (int(f_[1]), int(f_[11]) + int(f_[12]), comm)
        ours = {self.me}
        changed = True
        while changed:
            changed = False
            for pid, (ppid, _, _) in procs.items():
                if ppid in ours and pid not in ours:
                    ours.add(pid)
                    changed = True
        return {pid: (t, comm) for pid, (_, t, comm) in procs.items() if pid not in ours}

    def _run(self):
        prev, tprev = self._snap(), time.monotonic()
        while not self._stop.wait(0.5):
            cur, t = self._snap(), time.monotonic()
            busy = 0
            for pid, (ticks, comm) in cur.items():
                d = ticks - prev[pid][0] if pid in prev else ticks  # a new process: all of its time is recent
                if d > 0:
                    busy += d
                    self.top[comm] = self.top.get(comm, 0) + d / self.hz
            self.samples.append((t, busy / self.hz / (t - tprev)))
            prev, tprev = cur, t

    def mean_between(self, t0, t1):
        xs = [x for t, x in self.samples if t0 <= t <= t1]
        return sum(xs) / len(xs) if xs else None

    def stop(self):
        self._stop.set()
        self._t.join(timeout=2)


class LagPoller:
    """Runs `ftvm status --witness W` every `period` s and keeps the lag."""

    def __init__(self, ftvm, key, waddr, primary, period=0.1):
        self.ftvm, self.key, self.waddr, self.primary, self.period = ftvm, key, waddr, primary, period
        self.samples = []  # (unix_ms, sent, acked, lag)
        self.errors = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        nxt = time.monotonic()
        while not self._stop.is_set():
            try:
                r = subprocess.run([self.ftvm, "status", "--witness", self.waddr, "--key", self.key], capture_output=True, text=True, timeout=2)
                out = r.stdout
                m = STATUS_LOG_RE.search(out)
                prim = re.search(r"^primary: ([^@\s]+)", out, re.M)
                alive = re.search(r"^backup: \S+ \(alive,", out, re.M)
                if m and prim and prim.group(1) == self.primary and alive:
                    sent, acked, lag = map(int, m.groups())
                    if sent > 0:
                        self.samples.append((now_ms(), sent, acked, lag))
                elif r.returncode != 0:
                    self.errors += 1
            except Exception:
                self.errors += 1
            nxt += self.period
            delay = nxt - time.monotonic()
            if delay < 0:
                nxt = time.monotonic()
                delay = 0
            self._stop.wait(delay)

    def stop(self):
        self._stop.set()
        self._t.join(timeout=3)
        return self.samples


LINE_RE = re.compile(r"^\[(\d{4,})\] ticks=")


class ConsoleClient:
    """`ftvm console` following the primary through the witness; each line
    of its stdout is timestamped as it arrives (the client writes and
    flushes every console frame at once)."""

    def __init__(self, reg, ftvm, key, waddr, stderr_path=None):
        self.proc = Proc(reg, "console", [ftvm, "console", "--witness", waddr, "--key", key, "--give-up", "20"],
                         stderr_path=stderr_path, capture_stdout=True)
        self.end = None
        self.error = None
        self.unknown = []  # the client itself refuses frames it does not know

    @property
    def lines(self):
        """(seconds, unix_ms, text) of every line so far."""
        with self.proc._lock:
            return [(t / 1000.0, t, l) for t, l in self.proc.out_lines]

    def join(self, timeout):
        rc = self.proc.wait(timeout)
        if rc is None:
            self.error = "still running"
            return False
        if rc == 0:
            self.end = "ok"
        else:
            self.error = f"exit {rc}: {self.proc.err_text()[-300:]}"
        return True


# --------------------------------------------------------------------------
# the bench


class Bench:
    def __init__(self, args, reg):
        self.a = args
        self.reg = reg
        self.ftvm = args.ftvm
        self.key = args.key
        self.work = args.work
        self.problems = []
        self.run_no = 0
        self.results = {}
        self.section_load = {}
        self.foreign = None

    def note(self, msg):
        self.problems.append(msg)
        log("PROBLEM: " + msg)

    def path(self, name):
        return os.path.join(self.work, f"r{self.run_no:03d}-{name}")

    # ---- process helpers

    def start_witness(self):
        for attempt in range(5):
            port = free_port()
            w = Proc(self.reg, "witness", [self.ftvm, "witness", "--listen", f"127.0.0.1:{port}", "--key", self.key],
                     stderr_path=self.path("witness.err"))
            try:
                wait_listening(port, w)
                return w, f"127.0.0.1:{port}"
            except PortInUse:
                continue
        raise BenchError("could not start a witness")

    def start_backup(self, waddr):
        for attempt in range(5):
            baddr = f"127.0.0.1:{free_port()}"
            b = Proc(self.reg, "backup", [self.ftvm, "backup", "--witness", waddr, "--listen", baddr, "--key", self.key],
                     stdout_path=self.path("backup.out"), stderr_path=self.path("backup.err"))
            try:
                wait_until(lambda: self.status(waddr).get("backup") == baddr or not b.alive(), 5, "the backup to join the view", step=0.05)
                if not b.alive():
                    raise_port_or(b, "backup exited early")
                return b, baddr
            except PortInUse:
                continue
        raise BenchError("could not start a backup")

    def start_primary(self, waddr, cmdline):
        for attempt in range(5):
            paddr = f"127.0.0.1:{free_port()}"
            p = Proc(self.reg, "primary", [self.ftvm, "primary", "--witness", waddr, "--listen", paddr, "--key", self.key, "--no-stdin", "--cmdline", cmdline],
                     stdout_path=self.path("primary.out"), stderr_path=self.path("primary.err"))
            # a port clash shows up at once; anything else is the caller's business
            time.sleep(0.0)
            if p.wait(0.05) is not None and "port is in use" in p.err_text():
                continue
            return p, paddr
        raise BenchError("could not start a primary")

    def status(self, waddr):
        return witness_status(self.ftvm, self.key, waddr)

    def next_run(self):
        self.run_no += 1

    # ---- 1. failover

    def failover_once(self, i):
        self.next_run()
        secs = self.a.failover_seconds
        w, waddr = self.start_witness()
        b, baddr = self.start_backup(waddr)
        p, paddr = self.start_primary(waddr, f"seconds={secs}")
        c = Proc(self.reg, "console", [self.ftvm, "console", "--witness", waddr, "--key", self.key, "--give-up", "20"],
                 stdout_path=self.path("console.out"), stderr_path=self.path("console.err"))
        delay_ms = random.uniform(self.a.kill_min_ms, self.a.kill_max_ms)
        t_kill_target = p.t_spawn_mono + delay_ms / 1000.0
        while time.monotonic() < t_kill_target:
            time.sleep(min(0.01, max(0.0, t_kill_target - time.monotonic())))
        r = {"run": i, "kill_after_ms": round(delay_ms)}
        if not p.alive():
            self.note(f"failover run {i}: the primary died before the kill: {p.err_text()[-300:]}")
        st = {}
        try:
            st = self.status(waddr)
        except Exception:
            pass
        r["view_before"] = st.get("view")
        r["lag_before"] = int(st.get("sent", 0)) - int(st.get("acked", 0)) if st else None
        kill_ms = now_ms()
        p.kill(signal.SIGKILL)
        crc = c.wait(30)
        brc = b.wait(15)
        p.wait(2)
        r["console_rc"] = crc
        r["new_primary_rc"] = brc
        try:
            r["view_after"] = self.status(waddr).get("view")
        except Exception:
            r["view_after"] = None
        self.reg.stop([w, b, c, p])
        t_lost, _ = c.find_err(r"console: lost the primary")
        _, m_first = c.find_err(r"first output from new primary \S+ \(view (\d+)\) at unix_ms=(\d+)")
        t_prom, _ = b.find_err(r"backup: promoted to primary")
        t_live, m_live = b.find_err(r"primary: live at exit #(\d+) after replaying (\d+) records")
        t_lost_stream, _ = b.find_err(r"backup: lost the primary's log stream")
        r["failover_ms"] = (int(m_first.group(2)) - kill_ms) if m_first else None
        r["console_noticed_ms"] = (t_lost - kill_ms) if t_lost else None
        r["backup_noticed_ms"] = (t_lost_stream - kill_ms) if t_lost_stream else None
        r["promoted_ms"] = (t_prom - kill_ms) if t_prom else None
        r["live_ms"] = (t_live - kill_ms) if t_live else None
        # console content
        with open(self.path("console.out"), "rb") as f:
            text = f.read().decode("utf-8", "replace")
        nums = [int(m.group(1)) for m in (LINE_RE.match(l) for l in text.split("\n")) if m]
        done = re.search(r"^\[done\] ticks=\d+ lines=(\d+)", text, re.M)
        expected = int(done.group(1)) if done else secs * 10
        seen = {}
        for n in nums:
            seen[n] = seen.get(n, 0) + 1
        r["lost"] = sum(1 for n in range(1, expected + 1) if n not in seen) + (0 if done else 1)
        r["duplicated"] = sum(c_ - 1 for c_ in seen.values() if c_ > 1)
        r["out_of_order"] = sum(1 for a_, b_ in zip(nums, nums[1:]) if b_ < a_)
        other = [l for l in text.split("\n") if l and not LINE_RE.match(l) and not l.startswith(("[done]", "[boot]", "ftvm test guest"))]
        r["garbled"] = len(other)
        r["done"] = bool(done)
        if r["failover_ms"] is None:
            self.note(f"failover run {i}: no 'first output from new primary' line from the console (console rc {crc}); see {self.path('console.err')}")
        if r["lost"] or r["duplicated"] or r["out_of_order"] or r["garbled"]:
            self.note(f"failover run {i}: lost={r['lost']} duplicated={r['duplicated']} out_of_order={r['out_of_order']} garbled={r['garbled']} (kill at {r['kill_after_ms']} ms); files r{self.run_no:03d}-* in {self.work}")
        if crc != 0 or brc != 0:
            self.note(f"failover run {i}: console exit {crc}, new primary exit {brc}")
        return r

    def bench_failover(self):
        K = self.a.k
        log(f"[1/5] failover: {K} runs, seconds={self.a.failover_seconds} guest, kill -9 at {self.a.kill_min_ms}-{self.a.kill_max_ms} ms")
        runs = []
        for i in range(1, K + 1):
            r = self.failover_once(i)
            runs.append(r)
            log(f"  run {i}/{K}: kill at {r['kill_after_ms']} ms -> failover {fmt(r['failover_ms'], 0)} ms "
                f"(backup saw EOF +{fmt(r['backup_noticed_ms'], 0)}, promoted +{fmt(r['promoted_ms'], 0)}, live +{fmt(r['live_ms'], 0)}) "
                f"lost={r['lost']} dup={r['duplicated']} view {r['view_before']}->{r['view_after']}")
        self.results["failover"] = runs

    # ---- 2 + 3 + 5. output-rule latency, lag, bandwidth (timer-paced runs)

    def paced_once(self, mode, rnd):
        """mode 'ft': witness + backup + primary; 'solo': witness + primary."""
        self.next_run()
        secs = self.a.latency_seconds
        w, waddr = self.start_witness()
        procs = [w]
        b = None
        if mode == "ft":
            b, baddr = self.start_backup(waddr)
            procs.append(b)
        p, paddr = self.start_primary(waddr, f"seconds={secs}")
        procs.append(p)
        cl = ConsoleClient(self.reg, self.ftvm, self.key, waddr, self.path("console.err"))
        # Polled in both modes, so that both carry the same extra load; a
        # view without a backup gives no samples.
        poller = LagPoller(self.ftvm, self.key, waddr, paddr)
        prc = p.wait(secs + 30)
        cl.join(5)
        samples = poller.stop()
        brc = b.wait(15) if b else None
        self.reg.stop(procs + [cl.proc])
        r = {"mode": mode, "round": rnd, "primary_rc": prc, "backup_rc": brc, "end": cl.end, "client_error": cl.error}
        if cl.unknown:
            self.note(f"{mode} run (round {rnd}): the console server sent frames this client does not know: {cl.unknown[:3]}")
        if prc != 0 or (b and brc != 0) or cl.error:
            self.note(f"{mode} run (round {rnd}): primary exit {prc}, backup exit {brc}, console client: {cl.error or 'ok'}; files r{self.run_no:03d}-* in {self.work}")
        # Anchor: the primary prints "... is primary of view N" after it has
        # built the VM and just before it runs it (same in both modes).
        t_vm, _ = p.find_err(r"is primary of view \d+")
        if t_vm is None:
            self.note(f"{mode} run (round {rnd}): no 'is primary of view' line on the primary's stderr")
            t_vm = p.t_spawn_ms
        status = []
        for tm, tu, text in cl.lines:
            m = LINE_RE.match(text)
            if m:
                status.append((int(m.group(1)), tm, tu))
        r["lines"] = len(status)
        if len(status) != secs * 10:
            self.note(f"{mode} run (round {rnd}): console client got {len(status)} status lines, expected {secs * 10}")
        if status:
            n1, t1, _ = status[0]
            r["rel"] = [((tm - t1) - (n - n1) * 0.1) * 1000 for n, tm, _ in status]
            r["abs"] = [(tu - t_vm) - n * 100.0 for n, _, tu in status]
        else:
            r["rel"], r["abs"] = [], []
        r["lag"] = [s[3] for s in samples]
        r["lag_samples"] = len(samples)
        _, m = p.find_err(r"logged (\d+) events \(([^)]*)\), (\d+) bytes")
        if m:
            r["log_events"] = int(m.group(1))
            r["log_detail"] = m.group(2)
            r["log_bytes"] = int(m.group(3))
            r["guest_seconds"] = secs
        else:
            self.note(f"{mode} run (round {rnd}): no 'logged ... bytes' line on the primary's stderr")
        _, mx = p.find_err(r"guest exited with status \d+; (\d+) exits")
        r["exits"] = int(mx.group(1)) if mx else None
        return r

    def bench_paced(self):
        R = self.a.latency_rounds
        log(f"[2/5] output-rule latency: {R} rounds x (FT with backup, FT without backup), seconds={self.a.latency_seconds}, interleaved; lag polled meanwhile")
        runs = []
        for rnd in range(1, R + 1):
            order = ["ft", "solo"] if rnd % 2 else ["solo", "ft"]
            for mode in order:
                r = self.paced_once(mode, rnd)
                runs.append(r)
                log(f"  round {rnd} {mode:4s}: {r['lines']} lines, lateness vs first line p50 {fmt(median(r['rel']))} ms p99 {fmt(pct(r['rel'], 99))} ms; "
                    f"vs VM start p50 {fmt(median(r['abs']))} ms" + (f"; lag p50 {fmt(median(r['lag']), 0)} max {max(r['lag']) if r['lag'] else '-'} exits" if mode == "ft" else ""))
        self.results["paced"] = runs

    # ---- 4. progress: plain vs FT

    def plain_once(self, rnd):
        self.next_run()
        p = Proc(self.reg, "plain", [self.ftvm, "run", "--no-stdin", "--cmdline", self.workload],
                 stdout_path=self.path("plain.out"), stderr_path=self.path("plain.err"))
        rc = p.wait(120)
        self.reg.stop([p])
        t_end, m = p.find_err(r"ftvm: guest exited with status (\d+): (\d+) exits.* ([0-9.]+)s$")
        r = {"kind": "plain", "round": rnd, "rc": rc,
             "exit_s": p.t_exit_mono - p.t_spawn_mono if p.t_exit_mono else None,
             "guest_end_s": (t_end - p.t_spawn_ms) / 1000 if t_end else None,
             "self_reported_s": float(m.group(3)) if m else None,
             "exits": int(m.group(2)) if m else None}
        if rc != 0:
            self.note(f"plain run (round {rnd}) exited {rc}")
        return r

    def ft_once(self, rnd, with_backup=True):
        self.next_run()
        w, waddr = self.start_witness()
        procs = [w]
        b = None
        if with_backup:
            b, baddr = self.start_backup(waddr)
            procs.append(b)
        p, paddr = self.start_primary(waddr, self.workload)
        procs.append(p)
        # Lag only means something with a backup; without one the poller's
        # `ftvm status` processes would only compete with the primary.
        poller = LagPoller(self.ftvm, self.key, waddr, paddr) if with_backup else None
        rc = p.wait(180)
        samples = poller.stop() if poller else []
        brc = b.wait(60) if b else 0
        self.reg.stop(procs)
        t_end, m = p.find_err(r"primary: guest exited with status (\d+); (\d+) exits")
        _, mb = p.find_err(r"logged (\d+) events \(([^)]*)\), (\d+) bytes")
        t_bend, _ = b.find_err(r"backup: replayed to the end") if b else (None, None)
        r = {"kind": "ft" if b else "solo", "round": rnd, "rc": rc, "backup_rc": brc,
             "exit_s": p.t_exit_mono - p.t_spawn_mono if p.t_exit_mono else None,
             "guest_end_s": (t_end - p.t_spawn_ms) / 1000 if t_end else None,
             "backup_end_after_primary_ms": (t_bend - t_end) if (t_bend and t_end) else None,
             "exits": int(m.group(2)) if m else None,
             "log_bytes": int(mb.group(3)) if mb else None,
             "log_detail": mb.group(2) if mb else None,
             "lag": [s[3] for s in samples]}
        if rc != 0 or brc != 0:
            self.note(f"FT run{'' if b else ' without backup'} (round {rnd}) of {self.workload}: primary exit {rc}, backup exit {brc}; files r{self.run_no:03d}-* in {self.work}")
        if "never acknowledged" in p.err_text():
            self.note(f"FT run (round {rnd}): primary reports unacknowledged output: {p.err_text()[-300:]}")
        return r

    def bench_progress(self):
        R = self.a.progress_rounds
        log(f"[4/5] guest progress: {R} rounds x (plain run, FT primary with backup, FT primary alone) of '{self.workload}', interleaved")
        runs = []
        kinds = ["plain", "ft", "solo"]
        for rnd in range(1, R + 1):
            k = (rnd - 1) % 3
            order = kinds[k:] + kinds[:k]
            pair = {}
            for kind in order:
                pair[kind] = self.plain_once(rnd) if kind == "plain" else self.ft_once(rnd, with_backup=(kind == "ft"))
                runs.append(pair[kind])
            pl, ft, so = pair["plain"], pair["ft"], pair["solo"]
            ratio = lambda a, b: a / b if a and b else None
            log(f"  round {rnd}: guest end after plain {fmt(pl['guest_end_s'], 2)} s, FT+backup {fmt(ft['guest_end_s'], 2)} s, "
                f"FT alone {fmt(so['guest_end_s'], 2)} s; ratio plain/FT {fmt(ratio(pl['guest_end_s'], ft['guest_end_s']), 3)} "
                f"(plain/FT-alone {fmt(ratio(pl['guest_end_s'], so['guest_end_s']), 3)}); "
                f"FT lag p50 {fmt(median(ft['lag']), 0)} max {max(ft['lag']) if ft['lag'] else '-'} exits")
        self.results["progress"] = runs

    def detect_workload(self):
        if self.a.workload:
            self.workload = self.a.workload
            return
        try:
            r = subprocess.run([self.ftvm, "run", "--no-stdin", "--cmdline", "burst=3"], capture_output=True, text=True, timeout=20)
            ok = r.returncode == 0 and "[b0003]" in r.stdout
        except Exception:
            ok = False
        self.workload = f"burst={self.a.burst}" if ok else "seconds=3 hz=1000 lines=100"
        if not ok:
            log("the guest has no burst=N; falling back to the timer-paced 'seconds=3 hz=1000 lines=100'")

    # ---- report

    def report(self):
        out = []
        P = out.append
        res = self.results
        summary = []  # (metric, value, note)
        warnings = []

        if "failover" in res:
            runs = res["failover"]
            fo = [r["failover_ms"] for r in runs if r["failover_ms"] is not None]
            P("")
            P(f"== 1. Failover (kill -9 of the primary -> first byte from the new primary at the console), {len(runs)} runs")
            P(f"{'run':>4} {'kill@ms':>8} {'lag@kill':>9} {'bk EOF':>7} {'con EOF':>8} {'promoted':>9} {'live':>6} {'failover':>9} {'lost':>5} {'dup':>4} {'view':>7}")
            for r in runs:
                P(f"{r['run']:>4} {r['kill_after_ms']:>8} {fmt(r['lag_before'], 0):>9} {fmt(r['backup_noticed_ms'], 0):>7} {fmt(r['console_noticed_ms'], 0):>8} {fmt(r['promoted_ms'], 0):>9} "
                  f"{fmt(r['live_ms'], 0):>6} {fmt(r['failover_ms'], 0):>9} {r['lost']:>5} {r['duplicated']:>4} {str(r['view_before']) + '->' + str(r['view_after']):>7}")
            P("  (ms after the kill: bk/con EOF = the backup / the console lost the primary; promoted, live = logged by the backup;")
            P("   failover = the console's 'first output from new primary'; lag@kill = exits, from the witness just before the kill)")
            if fo:
                P(f"  failover_ms: p50 {fmt(pct(fo, 50), 0)}  p90 {fmt(pct(fo, 90), 0)}  p99 {fmt(pct(fo, 99), 0)}  max {fmt(max(fo), 0)}  (min {fmt(min(fo), 0)}, n={len(fo)})")
            prom = [r["promoted_ms"] for r in runs if r["promoted_ms"] is not None]
            if prom:
                P(f"  of which kill -> promotion: p50 {fmt(pct(prom, 50), 0)}  max {fmt(max(prom), 0)} ms (the witness waits out the 500 ms lease)")
            lost = sum(r["lost"] for r in runs)
            dup = sum(r["duplicated"] for r in runs)
            bad = [r["run"] for r in runs if r["lost"] or r["duplicated"] or r["out_of_order"] or r["garbled"] or r["console_rc"] != 0 or r["new_primary_rc"] != 0]
            P(f"  lines lost: {lost}, duplicated: {dup}, runs with any problem: {bad if bad else 'none'}")
            summary.append(("failover p50 / p90 / p99 / max (ms)", f"{fmt(pct(fo, 50), 0)} / {fmt(pct(fo, 90), 0)} / {fmt(pct(fo, 99), 0)} / {fmt(max(fo) if fo else None, 0)}", f"{len(fo)}/{len(runs)} runs"))
            summary.append(("failover lines lost / duplicated", f"{lost} / {dup}", f"{len(bad)} bad runs"))

        if "paced" in res:
            runs = res["paced"]
            ft = [r for r in runs if r["mode"] == "ft"]
            so = [r for r in runs if r["mode"] == "solo"]
            rel_ft = [x for r in ft for x in r["rel"]]
            rel_so = [x for r in so for x in r["rel"]]
            abs_ft = [x for r in ft for x in r["abs"]]
            abs_so = [x for r in so for x in r["abs"]]
            P("")
            P(f"== 2. Output-rule latency: console line arrival, FT primary with a live backup (a) vs FT primary alone in its view (b)")
            P(f"   {len(ft)}+{len(so)} runs of seconds={self.a.latency_seconds} (line n due at n*100 ms guest time), own console client on the primary")
            P(f"   lateness vs first line = (t_n - t_first) - (n - first)*100 ms   [what the brief asks; a constant delay cancels out]")
            P(f"   lateness vs VM start   = (t_n - t_start) - n*100 ms, t_start = when the primary logs 'is primary of view' (VM built,")
            P(f"                            about to run); includes the guest's boot (same in both), keeps a constant delay")
            P(f"{'':34} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8} {'n':>5}")
            for name, xs in (("(a) with backup, vs first line", rel_ft), ("(b) no backup,   vs first line", rel_so),
                             ("(a) with backup, vs VM start", abs_ft), ("(b) no backup,   vs VM start", abs_so)):
                P(f"  {name:32} {fmt(pct(xs, 50)):>8} {fmt(pct(xs, 90)):>8} {fmt(pct(xs, 99)):>8} {fmt(max(xs) if xs else None):>8} {len(xs):>5}")
            d50 = pct(rel_ft, 50) - pct(rel_so, 50)
            d99 = pct(rel_ft, 99) - pct(rel_so, 99)
            a50 = pct(abs_ft, 50) - pct(abs_so, 50)
            a99 = pct(abs_ft, 99) - pct(abs_so, 99)
            P(f"  added by the output rule (a - b): vs first line p50 {fmt(d50)} ms, p99 {fmt(d99)} ms;  vs VM start p50 {fmt(a50)} ms, p99 {fmt(a99)} ms")
            P("  per-run p50 vs VM start (ms): (a) " + ", ".join(fmt(median(r["abs"])) for r in ft) + ";  (b) " + ", ".join(fmt(median(r["abs"])) for r in so))
            summary.append(("output rule: lateness p50 / p99, (a) backup (ms)", f"{fmt(pct(rel_ft, 50))} / {fmt(pct(rel_ft, 99))}", "vs first line"))
            summary.append(("output rule: lateness p50 / p99, (b) alone (ms)", f"{fmt(pct(rel_so, 50))} / {fmt(pct(rel_so, 99))}", "vs first line"))
            summary.append(("output rule: added p50 / p99 (ms)", f"{fmt(d50)} / {fmt(d99)}", "vs first line"))
            summary.append(("output rule: added p50 / p99 (ms)", f"{fmt(a50)} / {fmt(a99)}", "vs VM start"))

        ft = [r for r in res.get("paced", []) if r["mode"] == "ft"]
        so = [r for r in res.get("paced", []) if r["mode"] == "solo"]
        P("")
        P("== 3. Backup lag (exits the primary is ahead of the backup's acknowledgement; `ftvm status` every 100 ms)")
        lag_paced = [x for r in ft for x in r["lag"]]
        lag_burst = [x for r in res.get("progress", []) if r["kind"] == "ft" for x in r["lag"]]
        for name, xs in ((f"timer-paced (seconds={self.a.latency_seconds})", lag_paced), (f"work-bound ({self.workload})", lag_burst)):
            if xs:
                P(f"  {name:32} p50 {fmt(pct(xs, 50), 0):>6}  p90 {fmt(pct(xs, 90), 0):>6}  max {max(xs):>6}  ({len(xs)} samples, {sum(1 for x in xs if x == 0)} at 0)")
                summary.append((f"backup lag p50 / max (exits), {name.split(' ')[0]}", f"{fmt(pct(xs, 50), 0)} / {max(xs)}", f"{len(xs)} samples"))
            else:
                P(f"  {name:32} no samples")
        P("  (the witness only learns sent/acked from the primary's pings, every 100 ms)")

        if "progress" in res:
            runs = res["progress"]
            pl = [r for r in runs if r["kind"] == "plain"]
            ftp = [r for r in runs if r["kind"] == "ft"]
            fts = [r for r in runs if r["kind"] == "solo"]
            P("")
            P(f"== 4. Guest progress, '{self.workload}': plain `ftvm run` vs FT primary with a live backup (and, to split the cost, FT primary alone)")
            P(f"{'':6} {'plain':>15} {'FT + backup':>15} {'FT alone':>15} {'plain/FT':>15} {'plain/FT alone':>15}")
            P(f"{'round':>6} {'end':>7} {'exit':>7} {'end':>7} {'exit':>7} {'end':>7} {'exit':>7} {'end':>7} {'exit':>7} {'end':>7} {'exit':>7}")
            re_, rx_, rs_ = [], [], []
            q = lambda a, b: a / b if a and b else None
            for a_, b_, c_ in zip(pl, ftp, fts):
                e, x, es, xs_ = q(a_["guest_end_s"], b_["guest_end_s"]), q(a_["exit_s"], b_["exit_s"]), q(a_["guest_end_s"], c_["guest_end_s"]), q(a_["exit_s"], c_["exit_s"])
                if e:
                    re_.append(e)
                if x:
                    rx_.append(x)
                if es:
                    rs_.append(es)
                P(f"{a_['round']:>6} " + " ".join(f"{fmt(v, 3):>7}" for v in (a_["guest_end_s"], a_["exit_s"], b_["guest_end_s"], b_["exit_s"], c_["guest_end_s"], c_["exit_s"], e, x, es, xs_)))
            P("  seconds; 'end' = process start -> its 'guest exited' stderr line; 'exit' = process start -> process exit")
            P("  (an FT primary's exit also includes waiting for the last acks and a fixed 300 ms for consoles)")
            if re_:
                P(f"  throughput ratio plain/FT: median {fmt(median(re_), 3)} (guest end), {fmt(median(rx_), 3)} (process exit); VMware FT reports 0.94-0.99")
                P(f"  plain/FT primary without a backup (logging, progress marks, gate; no replay competing for CPUs): median {fmt(median(rs_), 3)} (guest end)")
                summary.append(("progress ratio plain/FT (guest end)", fmt(median(re_), 3), f"{self.workload}, {len(re_)} rounds"))
                summary.append(("progress ratio plain/FT (process exit)", fmt(median(rx_), 3), ""))
                summary.append(("progress ratio plain/FT without backup", fmt(median(rs_), 3), "guest end"))
            bl = [r["backup_end_after_primary_ms"] for r in ftp if r["backup_end_after_primary_ms"] is not None]
            if bl:
                P(f"  backup finished replaying {fmt(median(bl), 0)} ms (median) after the primary's guest ended")

        P("")
        P("== 5. Log bandwidth (bytes the primary logged / guest seconds), timer-paced runs")
        for name, rs in (("(a) with backup", ft), ("(b) no backup", so)):
            bw = [r["log_bytes"] / r["guest_seconds"] for r in rs if r.get("log_bytes")]
            if bw:
                b50 = median(bw)
                P(f"  {name:16} {fmt(b50, 0):>8} B/s = {b50 * 8 / 1e6:.3f} Mbit/s  (min {fmt(min(bw), 0)}, max {fmt(max(bw), 0)} B/s; events: {rs[0].get('log_detail', '?')})")
                if name.startswith("(a)"):
                    summary.append(("log bandwidth, timer-paced (Mbit/s)", f"{b50 * 8 / 1e6:.3f}", f"{fmt(b50, 0)} B/s; goal < 20"))
        fts = [r for r in res.get("progress", []) if r["kind"] == "ft" and r.get("log_bytes") and r.get("guest_end_s")]
        if fts:
            bw = [r["log_bytes"] / r["guest_end_s"] for r in fts]
            b50 = median(bw)
            P(f"  work-bound ({self.workload}), bytes / primary run time: {fmt(b50, 0)} B/s = {b50 * 8 / 1e6:.2f} Mbit/s  (log {fts[0]['log_bytes']} bytes; {fts[0]['log_detail']})")
            summary.append(("log bandwidth, work-bound (Mbit/s)", f"{b50 * 8 / 1e6:.2f}", f"{self.workload}"))

        if self.section_load:
            P("")
            P("== Other processes on this host (CPUs they kept busy, mean over each part; not ftvm processes of this bench)")
            names = {"failover": "1 failover", "paced": "2/3/5 timer-paced runs", "progress": "4 progress runs"}
            for k, v in self.section_load.items():
                flag = "  <-- timings of this part are suspect" if v is not None and v > 0.2 else ""
                P(f"  {names[k]:24} {fmt(v, 2)} CPUs{flag}")
            top = sorted(self.foreign.top.items(), key=lambda kv: -kv[1])[:5] if self.foreign else []
            if top:
                P("  busiest: " + ", ".join(f"{c} {t:.1f} CPU-s" for c, t in top))
            worst = max((v for v in self.section_load.values() if v is not None), default=None)
            summary.append(("other processes' CPU use, worst part", fmt(worst, 2), "CPUs; > 0.2 skews timings"))
            if worst is not None and worst > 0.2:
                warnings.append(f"other processes kept {worst:.2f} of {os.cpu_count()} CPUs busy during part of the bench: timings are skewed (see above)")

        P("")
        P("== Summary")
        w1 = max(len(s[0]) for s in summary) if summary else 10
        w2 = max(len(s[1]) for s in summary) if summary else 10
        P(f"  {'metric':{w1}}  {'value':>{w2}}  note")
        P(f"  {'-' * w1}  {'-' * w2}  {'-' * 20}")
        for a_, b_, c_ in summary:
            P(f"  {a_:{w1}}  {b_:>{w2}}  {c_}")
        P("")
        for w_ in warnings:
            P("Warning: " + w_)
        if self.problems:
            P(f"Problems seen ({len(self.problems)}):")
            for pr in self.problems:
                P("  - " + pr)
        else:
            P("Problems seen: none")
        print("\n".join(out), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ftvm", required=True)
    ap.add_argument("--key", required=True, help="cluster key file (ftvm keygen)")
    ap.add_argument("--work", required=True)
    ap.add_argument("--pidfile")
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--failover-seconds", type=int, default=5)
    ap.add_argument("--kill-min-ms", type=int, default=1000)
    ap.add_argument("--kill-max-ms", type=int, default=3000)
    ap.add_argument("--latency-rounds", type=int, default=4)
    ap.add_argument("--latency-seconds", type=int, default=5)
    ap.add_argument("--progress-rounds", type=int, default=3)
    ap.add_argument("--burst", type=int, default=3000)
    ap.add_argument("--workload")
    ap.add_argument("--only", default="1,2,3,4,5")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.seed is not None:
        random.seed(a.seed)
    only = set(a.only.split(","))

    def on_term(signum, frame):
        raise KeyboardInterrupt

    # A background job of a non-interactive shell starts with SIGINT ignored;
    # take it back so that Ctrl-C stops the bench in any case.
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    reg = Registry(a.pidfile)
    b = Bench(a, reg)
    t0 = time.monotonic()
    try:
        b.detect_workload()
        b.foreign = ForeignLoad()
        for key, sections, fn in (("failover", {"1"}, b.bench_failover), ("paced", {"2", "3", "5"}, b.bench_paced),
                                  ("progress", {"3", "4", "5"}, b.bench_progress)):
            if only & sections:
                ts = time.monotonic()
                fn()
                b.section_load[key] = b.foreign.mean_between(ts, time.monotonic())
        b.foreign.stop()
        log(f"measurements took {time.monotonic() - t0:.0f} s")
        b.report()
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"results": b.results, "problems": b.problems, "workload": b.workload}, f, indent=1)
    except KeyboardInterrupt:
        log("interrupted; stopping every process started")
        return 130
    except BenchError as e:
        log(f"error: {e}")
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        reg.kill_all()
    return 1 if b.problems else 0


if __name__ == "__main__":
    sys.exit(main())
