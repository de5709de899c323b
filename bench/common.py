"""Shared benchmark machinery: timing with percentiles, peak memory in a fresh process, copy
bandwidth, and result files (``bench/results/<date>-<host>-<suite>.json`` plus a PNG).

Ratios are always taken between methods measured in the same run, interleaved, so that a noisy
shared machine slows every method alike.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def summarize(times_s: list[float]) -> dict:
    a = np.asarray(times_s) * 1e3
    return {
        "median_ms": float(np.median(a)),
        "p20_ms": float(np.percentile(a, 20)),
        "p80_ms": float(np.percentile(a, 80)),
        "repeats": len(a),
    }


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1):
    """Run every function ``warmup`` times, then ``repeats`` rounds, each in a fresh random
    order (seeded: a burst of load on the shared machine does not always land on the same
    method); seconds per call."""
    import random

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {k: summarize(v) for k, v in times.items()}


def copy_bandwidth_gbs(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Measured memory bandwidth of a large tensor copy (bytes read + written per second)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux or not permitted: the peak then covers the process lifetime
        pass


def peak_rss_bytes() -> int:
    """Peak resident size since the last :func:`reset_peak_rss` (VmHWM)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_extra_memory(module: str, func: str, kwargs: dict) -> int:
    """Peak extra resident memory of ``module.func(**kwargs)`` measured in a fresh process.

    The child builds its inputs, records its resident size, runs the call once and reports
    ``max RSS - RSS before the call``: what the call allocated at its peak (outputs included).
    """
    code = (
        f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        f"import {module} as m; "
        f"print('PEAK', json.dumps(m.{func}(**json.loads({json.dumps(kwargs)!r}))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=1800
    )
    for line in out.stdout.splitlines():
        if line.startswith("PEAK "):
            return int(json.loads(line[5:]))
    raise RuntimeError(f"memory probe failed: {out.stderr[-2000:]}")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine() -> dict:
    """What produced a result file: host, CPU model, threads, torch, the commit (and whether the
    working tree had uncommitted changes), the command line and the load average at the start."""
    from mtbkd.info import huge_pages_status

    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "host": socket.gethostname(),
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": None if status is None else bool(status),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "load_average": load_average(),
        "cpu_huge_pages": huge_pages_status(),
    }


def load_average() -> list[float] | None:
    """1-, 5- and 15-minute load averages (a busy shared machine shows here)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def dirty_note(mach: dict) -> str:
    return " (uncommitted changes)" if mach.get("uncommitted_changes") else ""


def results_dir(out_dir: Path | str | None, quick: bool) -> Path:
    """Where a suite writes: ``out_dir`` when given, else ``bench/results`` (the committed
    results the README and docs/BENCHMARKS.md quote), or ``bench/results/quick`` for a
    ``--quick`` smoke run so that it never overwrites them. An empty ``out_dir`` is refused (it
    once fell back to the default)."""
    here = Path(__file__).parent / "results"
    if out_dir is not None:
        if not str(out_dir):
            raise ValueError("the output folder is an empty string")
        if quick and Path(out_dir).resolve() == here.resolve():
            # smoke numbers over the committed latest-*.json / .md, nothing in the .md saying so
            raise ValueError(
                f"--quick results do not go into {here} (the committed results): give another "
                "--out, or leave it out (bench/results/quick)"
            )
        return Path(out_dir)
    return here / "quick" if quick else here


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and
    ``os.replace``: a reader (or a run killed midway) never sees a half-written file."""
    import tempfile

    from mtbkd._files import make_readable

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        make_readable(tmp)  # mkstemp's 0600, which os.replace would keep
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_results(suite: str, results: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    # date and time: a second run of the day (every machine here is called "vm") had replaced
    # the first one's file, whose numbers the docs quoted
    stamp = _dt.datetime.now().strftime("%Y-%m-%dT%H%M%S")
    path = out_dir / f"{stamp}-{socket.gethostname()}-{suite}.json"
    n = 1
    while path.exists():
        n += 1
        path = out_dir / f"{stamp}-{socket.gethostname()}-{suite}-{n}.json"
    text = json.dumps(results, indent=2)
    write_atomic(path, text)
    write_atomic(out_dir / f"latest-{suite}.json", text)
    return path


NO_PNG = "matplotlib not installed: no PNG"


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or None where matplotlib (an optional extra) is
    not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_suite(suite: str, results: dict, md: str, out_dir: Path,
               plot: Callable[[dict, Path], object]) -> tuple[Path, Path | None]:  # fmt: skip
    """Write a CPU suite's files as one consistent set: the dated and ``latest-<suite>.json``,
    ``latest-<suite>.md`` (both atomically), then ``latest-<suite>.png`` by ``plot``. Without
    matplotlib the results and the markdown say so, it is printed, and a ``latest-<suite>.png``
    of an earlier run is deleted (it would pass for this run's plot). Returns the JSON's path
    and the PNG's (None when none was drawn)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"latest-{suite}.png"
    plt = pyplot()
    if plt is None:
        results["plots"] = NO_PNG
        md = f"{md}\n\n{NO_PNG}."
    path = write_results(suite, results, out_dir)
    write_atomic(out_dir / f"latest-{suite}.md", md + "\n")
    png.unlink(missing_ok=True)  # an earlier run's plot never stands beside this run's results
    if plt is None:
        print(NO_PNG)
        return path, None
    plot(results, png)
    return path, png


def provenance(mach: dict, backends) -> str:
    """The last line of every CPU suite's markdown: what produced the numbers (CPU model,
    threads, torch, commit and whether the working tree had uncommitted changes) and the mtbkd
    backend that ran the fused column."""
    names = sorted({b for b in backends if b}) or ["unknown"]
    commit = str(mach.get("commit") or "unknown")[:10]
    # "on" / "off" / "n/a" of mtbkd.info's huge-page status (fresh [N, V] tensors page-fault
    # per 4 KB without them: part of every column's time on CPU)
    pages = mach.get("cpu_huge_pages")
    pages = f", huge pages {pages.split()[0]}" if pages else ""
    return (
        f"Machine: {mach.get('cpu', 'unknown CPU')}, {mach.get('threads')} threads{pages}, torch "
        f"{mach.get('torch', 'unknown')}, commit {commit}{dirty_note(mach)}; fused column: "
        f"mtbkd's {' / '.join(names)} backend."
    )
