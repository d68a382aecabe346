"""What every benchmark script shares: the machine description, result files, medians, launching.

Each script in ``benchmarks/`` answers one question and writes its results with the hardware
and the date (STYLE.md, habit 9); the description of the machine, the naming of the results
files and the way processes are launched live here once, so that every results file states
them the same way. Scripts import it as ``common`` (``python benchmarks/x.py`` puts
``benchmarks/`` first on ``sys.path``; a script loaded by path inserts its folder itself).

Nothing here names the host: results are committed.

Example::
    >>> import common
    >>> machine = common.machine_description()
    >>> common.results_path("slow_link", hardware=machine["cpu"]).name
    'slow_link_amd-epyc_2026-12-01.md'
"""

import datetime
import json
import os
import platform
import re
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
