"""The audit phase: what auditing and session recording cost a download.

Four gateway processes, all with the Cython relay, differ only in their ``audit``
section: ``off`` (no audit, today's gateway), ``none`` (events only), ``pty`` (events,
pty sessions recorded: the non-pty download is not) and ``all`` (the download is
recorded as a raw ``.stdout`` file, ``on_overflow: drop``). Each gets its own OpenSSH
ControlMaster; every round downloads ``--size`` bytes (``head -c N /dev/zero``) through
each, in rotating order, and reads the gateway's CPU from ``/proc/PID/stat``. After each
``all`` transfer the recording is checked: its ``session.ended`` event, then the file,
byte for byte against ``/dev/zero`` (``cmp``), then removed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from .throughput import GIB, Target, run_transfer, verify

__all__ = ["MODES", "render", "run"]

MODES = ("off", "none", "pty", "all")


def _log(text: str) -> None:
    import sys

    print(text, file=sys.stderr, flush=True)


def _last_download(directory: Path, size: int, seen: set[str]) -> dict[str, Any]:
    """The ``session.ended`` event of the download just made (waits for the writer)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for path in sorted(directory.glob("events-*.jsonl")):
            for line in path.read_text().splitlines():
                event = json.loads(line)
                key = f"{event['connection']}/{event.get('session')}"
                if (
                    event["event"] == "session.ended"
                    and event["bytes"]["stdout"] == size
                    and key not in seen
                ):
                    seen.add(key)
                    return dict(event)
        time.sleep(0.2)
    raise RuntimeError(f"no session.ended event for the download in {directory}")


def _check_recording(directory: Path, event: dict[str, Any], size: int) -> dict[str, Any]:
    recording = event["recording"]
    if recording is None or recording["format"] != "raw":
        raise RuntimeError(f"the download was not recorded: {event}")
    path = directory / recording["files"][0]
    deadline = time.monotonic() + 120
    expected = size - recording["dropped_bytes"]
    while path.stat().st_size < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    written = path.stat().st_size
    same = written == size and (
        subprocess.run(["cmp", "-s", "-n", str(size), str(path), "/dev/zero"]).returncode == 0
    )
    path.unlink()
    return {"recorded": written, "dropped": recording["dropped_bytes"], "byte_exact": same}


def run(bench: Any, args: argparse.Namespace) -> dict[str, Any]:
    assert bench.cluster is not None
    dirs = {mode: bench.workdir / f"audit-{mode}" for mode in MODES}
    targets: list[Target] = []
    for mode in MODES:
        extra = [] if mode == "off" else ["--audit-dir", str(dirs[mode]), "--recordings", mode]
        server = bench.gateway("cython", extra, name=f"gateway-audit-{mode}")
        targets.append(Target(mode, server, None, True))  # type: ignore[arg-type]
    for target in targets:
        target.master = bench.master(f"audit-{target.name}", target.server.port)
    seen: set[str] = set()
    for target in targets:
        verify(target, 8 << 20)
    # The verification's own download was recorded too: check it like the others.
    _check_recording(dirs["all"], _last_download(dirs["all"], 8 << 20, seen), 8 << 20)
    _log(f"audit: {len(targets)} gateways verified; {args.rounds} rounds of {args.size} bytes")
    samples: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
        for target in order:
            result = run_transfer(target, bench.cluster, "down", args.size)
            sample: dict[str, Any] = {
                "mode": target.name,
                "round": rnd,
                "size": args.size,
                "seconds": result.seconds,
                "server_cpu": result.server_cpu,
                "cluster_cpu": result.cluster_cpu,
            }
            if target.name == "all":
                event = _last_download(dirs["all"], args.size, seen)
                sample.update(_check_recording(dirs["all"], event, args.size))
            samples.append(sample)
            _log(
                f"  round {rnd} {target.name:5} {args.size / result.seconds / 1e6:7.1f} MB/s  "
                f"gateway {result.server_cpu * GIB / args.size:.2f} s/GiB"
                + (
                    f"  recording {'byte-exact' if sample['byte_exact'] else 'INCOMPLETE'}"
                    f" ({sample['dropped']} bytes dropped)"
                    if target.name == "all"
                    else ""
                )
            )
    return {"size": args.size, "rounds": args.rounds, "samples": samples}


def render(data: dict[str, Any]) -> list[str]:
    """Markdown table of the medians (ratios to ``off`` per round, then the median)."""
    samples = data["samples"]
    size = int(data["size"])
    by: dict[tuple[str, int], dict[str, Any]] = {(s["mode"], s["round"]): s for s in samples}
    rounds = sorted({s["round"] for s in samples})

    def per_gib(s: dict[str, Any]) -> float:
        return float(s["server_cpu"]) * GIB / size

    lines = [
        f"### Audit: download CPU by `audit.recordings` ({size / GIB:g} GiB per transfer, "
        f"Cython relay, medians of {len(rounds)} rounds)",
        "",
        "| audit | MB/s | gateway CPU s/GiB | x no audit | x `none` | devcluster CPU s/GiB "
        "| recording |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    labels = {
        "off": "no `audit` section (today)",
        "none": "`recordings: none` (events only)",
        "pty": "`recordings: pty` (download not recorded)",
        "all": "`recordings: all` (download recorded)",
    }
    for mode in MODES:
        mine = [by[(mode, r)] for r in rounds if (mode, r) in by]
        if not mine:
            continue

        def ratio(base: str, mode: str = mode) -> float:
            values = [
                per_gib(by[(mode, r)]) / per_gib(by[(base, r)])
                for r in rounds
                if (mode, r) in by and (base, r) in by
            ]
            return statistics.median(values) if values else float("nan")

        mb_s = statistics.median(s["size"] / s["seconds"] / 1e6 for s in mine)
        cpu = statistics.median(per_gib(s) for s in mine)
        cluster = statistics.median(float(s["cluster_cpu"]) * GIB / size for s in mine)
        rec = ""
        if mode == "all":
            exact = sum(1 for s in mine if s.get("byte_exact"))
            dropped = sum(int(s.get("dropped", 0)) for s in mine)
            rec = f"{exact}/{len(mine)} byte-exact, {dropped} bytes dropped"
        lines.append(
            f"| {labels[mode]} | {mb_s:.0f} | {cpu:.2f} | {ratio('off'):.2f} "
            f"| {ratio('none'):.2f} | {cluster:.2f} | {rec} |"
        )
    lines += [
        "",
        "Targets: `none` within noise of no audit; `all` at most 1.2x of `none`.",
        "",
    ]
    return lines
