"""What every benchmark script shares: the machine description, result files, medians, launching.

Each script in ``benchmarks/`` answers one question and writes its results with the hardware
and the date (STYLE.md, habit 9); the description of the machine, the naming of the results
files, the way processes are launched and the shaped links between pretend nodes (network
namespaces, veth, tbf: :class:`Nodes`) live here once, so that every results file states
them the same way. Scripts import it as ``common`` (``python benchmarks/x.py`` puts
``benchmarks/`` first on ``sys.path``; a script loaded by path inserts its folder itself).

Nothing here names the host: results are committed.

Example::
    >>> import common
    >>> machine = common.machine_description()
    >>> common.results_path("slow_link", hardware=machine["cpu"]).name
    'slow_link_amd-epyc_2026-12-01.md'
"""

import atexit
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_DIR = HERE / "results"


# -- the machine ------------------------------------------------------------------------------

def cpu_name() -> str:
    """The CPU model (lscpu's "Model name", else /proc/cpuinfo's "model name", else platform's)."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = re.search(r"^Model name:\s*(.+)$", lscpu, re.MULTILINE)
        if model:
            return model.group(1).strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            model = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        if model:
            return model.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (the machine is shared: every timing says under which load)."""
    return os.getloadavg()


def machine_description() -> dict:
    """CPU, cores, memory, kernel, Python, torch and the 1-min load average now; no host name."""
    import torch

    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "mem_gib": round(mem_gib, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_avg_1min_at_start": round(load_average()[0], 2),
    }


# -- results files ----------------------------------------------------------------------------

def today() -> str:
    """The local date as YYYY-MM-DD, the date in results file names and titles."""
    return datetime.date.today().isoformat()


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def slug(text: str) -> str:
    """``AMD EPYC 7B13`` -> ``amd-epyc-7b13``: a hardware name as part of a file name."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def results_path(kind: str, suffix: str = ".md", *, hardware: str | None = None, date: str | None = None,
                 tag: str = "") -> Path:
    """``benchmarks/results/<kind>[_<hardware slug>]_<date>[_<tag>]<suffix>``.

    Example::
        >>> results_path("supernet_vs_standalone", ".json", date="2026-12-01", tag="adamw").name
        'supernet_vs_standalone_2026-12-01_adamw.json'
    """
    parts = [kind, *([slug(hardware)] if hardware else []), date or today(), *([tag] if tag else [])]
    return RESULTS_DIR / ("_".join(parts) + suffix)


def command_line(script: str, argv=None) -> str:
    """How the script was run, as the results quote it: ``python benchmarks/<script> <args>``."""
    args = list(argv if argv is not None else sys.argv[1:])
    return " ".join([f"python benchmarks/{script}", *args])


def write_results(stem: Path, markdown: str, payload=None, *, indent: int = 1) -> None:
    """``stem.md`` (the table people read) and, with a payload, ``stem.json`` (everything measured)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    if payload is not None:  # appended, not with_suffix: a tag may hold a dot (``lr3e-3``, ``kd0.5``)
        Path(f"{stem}.json").write_text(json.dumps(payload, indent=indent) + "\n")
    Path(f"{stem}.md").write_text(markdown)


def median_range(values) -> tuple[float, float, float]:
    """(median, min, max): the figure quoted and its spread over repeats."""
    values = list(values)
    return statistics.median(values), min(values), max(values)


# -- launching --------------------------------------------------------------------------------

def repo_env(**extra: str) -> dict:
    """This environment with the checkout first on PYTHONPATH (the launched processes import this tree)."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


def torchrun_command(nproc_per_node: int, *args: str, standalone: bool = True) -> list[str]:
    """``torchrun [--standalone] --nproc_per_node=N <args>`` with this interpreter."""
    return [sys.executable, "-m", "torch.distributed.run", *(["--standalone"] if standalone else []),
            f"--nproc_per_node={nproc_per_node}", *args]


def run_logged(cmd: list[str], log: Path, *, timeout_s: float, env: dict | None = None) -> float:
    """Run ``cmd`` in the checkout, its output to ``log``; its wall seconds, or RuntimeError with the tail."""
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, env=env or repo_env(), capture_output=True, text=True, timeout=timeout_s)
    log.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise RuntimeError(f"{log.stem} exited {out.returncode}:\n{(out.stdout + out.stderr)[-3000:]}")
    return time.perf_counter() - start


def init_loopback_gloo(rank: int, world_size: int, port: int) -> None:
    """A gloo process group over ``lo`` for the processes of :func:`spawn_gloo`."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def spawn_gloo(worker, nprocs: int, *args) -> dict:
    """``worker(rank, nprocs, *args, out)`` in nprocs spawned processes; what they put in ``out``.

    Example::
        >>> spawn_gloo(_worker, 2, 29655)  # _worker calls init_loopback_gloo(rank, world_size, port)
    """
    import torch.multiprocessing as mp

    manager = mp.get_context("spawn").Manager()
    out = manager.dict()
    mp.spawn(worker, args=(nprocs, *args, out), nprocs=nprocs)
    return dict(out)


# -- shaped links: nodes in network namespaces --------------------------------------------------

TWO_NODE_ADDRS = ("10.77.0.1", "10.77.0.2")
PREFIX_LEN = 24


def rate_bits(rate: str) -> float:
    """``100mbit`` -> 1e8 (tc's rate syntax); ValueError otherwise."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", rate.lower())
    if not match:
        raise ValueError(f"--links {rate!r}: expected a tc rate like 100mbit or 1gbit, or 'loopback'")
    return float(match.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[match.group(2)]


def tbf_burst(rate: str) -> str:
    """1 ms of traffic, at least 32 kbit: 32 kbit at 1 Gbit/s gave 871 Mbit/s TCP goodput, 1 Mbit 934."""
    return f"{max(32_000, int(rate_bits(rate) / 1000)) // 1000}kbit"


def _sh(*cmd, check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def netns_unavailable_reason() -> str | None:
    """None if this process can build namespaces and shape links, else one line saying why not."""
    if os.geteuid() != 0:
        return "needs root (ip netns, tc): run as root, or use --links loopback"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs iproute2's `{tool}` on PATH (ip netns, tc): install iproute2, or use --links loopback"
    return None


class Nodes:
    """``count`` pretend nodes, each a network namespace with lo up and one interface, joined by shaped links.

    Two nodes: namespaces ``<name>a``, ``<name>b`` and one veth pair ``<name>va`` <-> ``<name>vb``
    (addresses ``<subnet>.1``, ``.2``). More: namespaces ``<name>0`` .. ``<name>{count-1}``, each with
    a veth ``<name>v<i>`` whose peer ``<name>p<i>`` sits on a bridge in a hub namespace ``<name>h``
    (a star: every node has its own uplink). :meth:`shape` puts tbf at the rate on every link end's
    egress, so each node sends and receives at most ``rate``. Everything is removed on ``close()``,
    at interpreter exit and on SIGTERM/SIGINT (deleting a namespace deletes its veth ends).

    Example::
        >>> nodes = Nodes("diloco123", 4, subnet="10.78.0")    # root
        >>> nodes.shape("10mbit"); nodes.ns[2], nodes.addr[2]
        ('diloco1232', '10.78.0.3')
    """

    def __init__(self, name: str, count: int = 2, *, subnet: str = "10.77.0"):
        if count < 2:
            raise ValueError(f"count={count}: expected at least 2 nodes")
        self.count = count
        self.addr = tuple(f"{subnet}.{i + 1}" for i in range(count))
        if count == 2:
            self.ns, self.iface, self.hub, self.ports = (f"{name}a", f"{name}b"), (f"{name}va", f"{name}vb"), None, ()
        else:
            self.ns = tuple(f"{name}{i}" for i in range(count))
            self.iface = tuple(f"{name}v{i}" for i in range(count))
            self.hub, self.ports = f"{name}h", tuple(f"{name}p{i}" for i in range(count))
        self._closed = False
        atexit.register(self.close)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            self._build(name)
        except subprocess.CalledProcessError as error:
            self.close()
            raise RuntimeError(f"building the namespaces failed: {' '.join(error.cmd)}: {error.stderr.strip()}")

    def _build(self, name: str) -> None:
        for ns in self.ns:
            _sh("ip", "netns", "add", ns)
        if self.hub is None:
            _sh("ip", "link", "add", self.iface[0], "type", "veth", "peer", "name", self.iface[1])
        else:
            _sh("ip", "netns", "add", self.hub)
            bridge = f"{name}br"
            _sh("ip", "-n", self.hub, "link", "add", bridge, "type", "bridge")
            _sh("ip", "-n", self.hub, "link", "set", bridge, "up")
            for iface, port in zip(self.iface, self.ports):
                _sh("ip", "link", "add", iface, "type", "veth", "peer", "name", port)
                _sh("ip", "link", "set", port, "netns", self.hub)
                _sh("ip", "-n", self.hub, "link", "set", port, "master", bridge)
                _sh("ip", "-n", self.hub, "link", "set", port, "up")
        for ns, iface, addr in zip(self.ns, self.iface, self.addr):
            _sh("ip", "link", "set", iface, "netns", ns)
            _sh("ip", "-n", ns, "addr", "add", f"{addr}/{PREFIX_LEN}", "dev", iface)
            _sh("ip", "-n", ns, "link", "set", iface, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")

    def _on_signal(self, signum, frame):
        self.close()
        raise SystemExit(128 + signum)

    def _ends(self):
        ends = list(zip(self.ns, self.iface))
        if self.hub is not None:
            ends += [(self.hub, port) for port in self.ports]
        return ends

    def shape(self, rate: str | None) -> None:
        """tbf at ``rate`` on every link end's egress (None: remove the shaping)."""
        for ns, iface in self._ends():
            if rate is None:
                _sh("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", iface, "root", check=False)
            else:
                _sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", iface, "root", "tbf",
                    "rate", rate, "burst", tbf_burst(rate), "latency", "50ms")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for ns in (*self.ns, *([self.hub] if self.hub else [])):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class TwoNodes(Nodes):
    """Two nodes over one veth pair at 10.77.0.1 and .2 (benchmarks/slow_link.py's layout)."""

    def __init__(self, name: str):
        super().__init__(name, 2, subnet=TWO_NODE_ADDRS[0].rsplit(".", 1)[0])


_PROBE = r"""
import socket, sys, time
mode, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "sink":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port)); s.listen(1); c, _ = s.accept()
    while c.recv(1 << 20):
        pass
    c.sendall(b"x")
else:
    nbytes, buf = int(sys.argv[4]), b"\0" * (1 << 20)
    for _ in range(100):
        try:
            c = socket.create_connection((addr, port)); break
        except OSError:
            time.sleep(0.05)
    start, sent = time.perf_counter(), 0
    while sent < nbytes:
        c.sendall(buf); sent += len(buf)
    c.shutdown(socket.SHUT_WR); c.recv(1)
    print(sent * 8 / (time.perf_counter() - start))
"""


def probe_goodput(nodes: Nodes, rate: str, port: int) -> float:
    """TCP goodput from the first node to the second in bit/s over ~1.5 s of a bulk transfer."""
    nbytes = int(rate_bits(rate) / 8 * 1.5)
    sink = subprocess.Popen(["ip", "netns", "exec", nodes.ns[1], sys.executable, "-c", _PROBE,
                             "sink", nodes.addr[1], str(port)])
    try:
        out = subprocess.run(["ip", "netns", "exec", nodes.ns[0], sys.executable, "-c", _PROBE,
                              "src", nodes.addr[1], str(port), str(nbytes)],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    finally:
        sink.wait(timeout=30)
    return float(out.strip())


def wait_all(procs: list[subprocess.Popen], logs: list, timeout_s: float, *, what: str) -> None:
    """Wait for our own process groups (``start_new_session``) until a shared deadline, stop the rest, and raise
    one RuntimeError with the log tails of every process that failed (``what`` names them)."""
    deadline = time.monotonic() + timeout_s
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # our own torchrun and its workers only
                proc.wait(timeout=30)
    failed = [i for i, proc in enumerate(procs) if proc.returncode != 0]
    if failed:
        tails = []
        for i in failed:
            logs[i].seek(0)
            tails.append(f"--- node {i} (rc {procs[i].returncode}) ---\n" + logs[i].read()[-3000:])
        raise RuntimeError(f"{what} failed:\n" + "\n".join(tails))
