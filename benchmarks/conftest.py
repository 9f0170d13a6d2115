"""pytest-benchmark plumbing for the relay benchmarks.

* Collects ``bench_*.py`` (the project's ``python_files`` only matches ``test_*.py``,
  and benchmarks stay out of the default test run).
* After the run, prints the ratios the targets are stated in, from the medians
  measured side by side in this one run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)  # an explicit path is collected anyway
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _medians(config: pytest.Config) -> dict[tuple[str, Any, Any], float]:
    session = getattr(config, "_benchmarksession", None)
    out: dict[tuple[str, Any, Any], float] = {}
    for bench in getattr(session, "benchmarks", None) or []:
        params = bench.params or {}
        try:
            median = bench.stats.median
        except (AttributeError, ValueError, ZeroDivisionError):
            continue
        out[(bench.name.split("[")[0], params.get("impl"), params.get("size"))] = median
    return out


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    medians = _medians(config)
    if not medians:
        return
    write = terminalreporter.write_line
    terminalreporter.section("relay benchmark ratios (medians, this run)")
    for size in (64, 4096, 65536):
        cy = medians.get(("test_demux", "cython", size))
        if cy is None:
            continue
        parts = [f"demux {size:>5} B frames:"]
        for other in ("aiohttp", "python"):
            t = medians.get(("test_demux", other, size))
            if t is not None:
                parts.append(f"cython is {t / cy:6.1f}x {other}")
        write("  ".join(parts))
    for impl in ("cython", "python"):
        t = medians.get(("test_stdin_encode", impl, 65536))
        if t is not None:
            write(f"stdin encode+mask 64 KiB ({impl}): {65536 / t / 1e9:.2f} GB/s")
