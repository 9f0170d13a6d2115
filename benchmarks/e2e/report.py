"""Markdown tables and the issue-7 targets from the samples of one run."""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

__all__ = ["render", "summarize_streams", "summarize_throughput"]

GIB = 1 << 30

LABELS = {
    "direct": "direct asyncssh server",
    "cython": "gateway, Cython relay",
    "python": "gateway, pure-Python relay",
    "aiohttp": "gateway, aiohttp baseline",
}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


Rows = dict[str, dict[str, dict[str, list[float]]]]


def _by_round(
    samples: list[dict[str, Any]], round_of: Any, name_of: str
) -> tuple[dict[tuple[str, int], dict[str, dict[str, Any]]], Rows]:
    """Samples grouped by (direction, round), then by name (so a row can be compared with
    another measured in the same round), and an empty table of per-round values."""
    by_round: dict[tuple[str, int], dict[str, dict[str, Any]]] = defaultdict(dict)
    for s in samples:
        by_round[(s["direction"], round_of(s))][s[name_of]] = s
    return by_round, defaultdict(lambda: defaultdict(dict))


def _medians(out: Rows) -> dict[str, dict[str, dict[str, float]]]:
    """Each row's per-round values reduced to their median, plus how many rounds."""
    return {
        direction: {
            name: {key: _median(vals) for key, vals in row.items()}
            | {"rounds": float(len(row["mb_s"]))}
            for name, row in rows.items()
        }
        for direction, rows in out.items()
    }


def summarize_throughput(samples: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per direction and target: medians of MB/s, CPU per GiB and of per-round ratios."""
    by_round, out = _by_round(samples, lambda s: s["extra"]["round"], "target")
    for (direction, _rnd), targets in by_round.items():
        direct = targets.get("direct")
        for name, s in targets.items():
            row = out[direction][name]
            per_gib = GIB / s["size"]
            mb_s = s["size"] / s["seconds"] / 1e6
            cpu = s["server_cpu"] * per_gib
            row.setdefault("mb_s", []).append(mb_s)
            row.setdefault("cpu", []).append(cpu)
            row.setdefault("cluster_cpu", []).append(s["cluster_cpu"] * per_gib)
            row.setdefault("client_cpu", []).append(s["client_cpu"] * per_gib)
            parts = [
                s["server_cpu"] * per_gib,
                s["cluster_cpu"] * per_gib,
                s["client_cpu"] * per_gib,
            ]
            row.setdefault("total_cpu", []).append(sum(parts))
            # Two cores, and no process can use more than one of them.
            row.setdefault("ceiling", []).append(GIB / max(sum(parts) / 2, *parts) / 1e6)
            if direct is not None:
                d_mb_s = direct["size"] / direct["seconds"] / 1e6
                d_cpu = direct["server_cpu"] * GIB / direct["size"]
                row.setdefault("ratio", []).append(mb_s / d_mb_s)
                row.setdefault("cpu_ratio", []).append(cpu / d_cpu)
                row.setdefault("overhead", []).append(cpu - d_cpu)
    return _medians(out)


STREAM_LABELS = {
    "floor": "TLS floor: bytes counted, frames pre-built",
    "cython": "kuberun ExecStream, Cython relay",
    "python": "kuberun ExecStream, pure-Python relay",
    "aiohttp": "aiohttp baseline (WsApiClient)",
}


def summarize_streams(data: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Per direction and variant: medians of MB/s, CPU per GiB and of the per-round
    relay cost (the variant's consumer CPU minus the floor's in the same round).

    ``cpu``/``relay_cost`` come from ``/proc`` (10 ms ticks); ``self_cpu``/``self_cost``
    from the consumer's own process CPU clock (nanoseconds), which resolves the small
    differences of a short transfer.
    """
    by_round, out = _by_round(data.get("samples", []), lambda s: s["round"], "variant")
    for (direction, _rnd), variants in by_round.items():
        floor = variants.get("floor")
        for name, s in variants.items():
            row = out[direction][name]
            per_gib = GIB / s["size"]
            row.setdefault("mb_s", []).append(s["size"] / s["seconds"] / 1e6)
            row.setdefault("cluster_cpu", []).append(s["cluster_cpu"] * per_gib)
            for cpu, cost in (("cpu", "relay_cost"), ("self_cpu", "self_cost")):
                row.setdefault(cpu, []).append(s[cpu] * per_gib)
                if floor is not None:
                    extra = s[cpu] * per_gib - floor[cpu] * GIB / floor["size"]
                    row.setdefault(cost, []).append(extra)
    return _medians(out)


def _relay_share(
    summary: dict[str, dict[str, dict[str, float]]], direction: str, key: str = "relay_cost"
) -> tuple[float, float, float] | None:
    """(Cython relay cost, aiohttp relay cost, their ratio) in one direction, if measured."""
    rows = summary.get(direction, {})
    cy, base = rows.get("cython", {}), rows.get("aiohttp", {})
    if key not in cy or key not in base:
        return None
    ratio = cy[key] / base[key] if base[key] > 0 else float("nan")
    return cy[key], base[key], ratio


def _size(size: int) -> str:
    return f"{size / GIB:g} GiB" if size >= GIB else f"{size / (1 << 20):g} MiB"


def _streams_tables(data: dict[str, Any]) -> list[str]:
    summary = summarize_streams(data)
    if not summary:
        return []
    lines = [
        f"### Exec stream alone ({_size(data['size'])} per transfer, no SSH, "
        f"medians of {data['rounds']} rounds)",
        "",
        "Each consumer is its own process (uvloop) exec'ing into one devcluster Pod. The floor "
        "opens the same TLS connection and WebSocket upgrade, then does no per-byte work in "
        "Python: a 256 KiB BufferedProtocol that only counts bytes, and the same pre-masked "
        "64 KiB stdin frame written again and again. Relay cost = consumer CPU minus the "
        "floor's in the same round: what the exec stream code costs on top of TLS. CPU from "
        "/proc/PID/stat (10 ms ticks); in brackets, the consumer's own process CPU clock "
        "around the transfer (ns), for short transfers.",
        "",
        "| direction | exec stream | MB/s | consumer CPU s/GiB | devcluster CPU s/GiB "
        "| relay cost s/GiB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    shares: list[str] = []
    for direction in ("down", "up"):
        rows = summary.get(direction, {})
        for name in ("floor", "cython", "python", "aiohttp"):
            row = rows.get(name)
            if row is None:
                continue
            cost = (
                ""
                if name == "floor"
                else f"{_fmt(row.get('relay_cost', float('nan')))} "
                f"({_fmt(row.get('self_cost', float('nan')), '.3f')})"
            )
            lines.append(
                f"| {direction} | {STREAM_LABELS[name]} | {_fmt(row['mb_s'], '.0f')} "
                f"| {_fmt(row['cpu'])} ({_fmt(row['self_cpu'], '.3f')}) "
                f"| {_fmt(row['cluster_cpu'])} | {cost} |"
            )
        share = _relay_share(summary, direction)
        precise = _relay_share(summary, direction, "self_cost")
        if share is not None and precise is not None:
            shares.append(f"{direction} {_fmt(share[2])} ({_fmt(precise[2])})")
    lines.append("")
    if shares:
        lines += [f"Relay cost, Cython / aiohttp: {', '.join(shares)}.", ""]
    return lines


def _fmt(value: float, spec: str = ".2f") -> str:
    return "n/a" if value != value else format(value, spec)


def _throughput_tables(summary: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    lines: list[str] = []
    order = ["direct", "cython", "python", "aiohttp"]
    for direction, title in (("down", "Download"), ("up", "Upload")):
        targets = summary.get(direction)
        if not targets:
            continue
        lines += [
            f"### {title} (`{'head -c N /dev/zero' if direction == 'down' else 'cat >/dev/null'}`)",
            "",
            "| server | MB/s | ratio to direct | server CPU s/GiB | CPU x direct "
            "| overhead s/GiB | devcluster CPU s/GiB | ssh client CPU s/GiB "
            "| all three s/GiB | CPU ceiling MB/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name in order:
            row = targets.get(name)
            if row is None:
                continue
            direct = name == "direct"
            lines.append(
                f"| {LABELS[name]} | {_fmt(row['mb_s'], '.0f')} "
                f"| {'1' if direct else _fmt(row.get('ratio', float('nan')))} "
                f"| {_fmt(row['cpu'])} "
                f"| {'1' if direct else _fmt(row.get('cpu_ratio', float('nan')))} "
                f"| {'' if direct else _fmt(row.get('overhead', float('nan')))} "
                f"| {'' if direct else _fmt(row['cluster_cpu'])} "
                f"| {_fmt(row['client_cpu'])} | {_fmt(row['total_cpu'])} "
                f"| {_fmt(row['ceiling'], '.0f')} |"
            )
        lines.append("")
    return lines


def _latency_table(data: dict[str, Any]) -> list[str]:
    targets = data.get("targets", {})
    if not targets:
        return []
    direct = targets.get("direct", {})
    lines = [
        f"### Keystroke round trip ({data['round_trips']} per server, pty, `cat`)",
        "",
        "| server | p50 ms | p99 ms | added p50 ms | added p99 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("direct", "cython", "python", "aiohttp", "exec stream only", "local pty only"):
        row = targets.get(name)
        if row is None:
            continue
        if name not in LABELS:
            lines.append(f"| {name} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} | | |")
            continue
        added50 = row["p50_ms"] - direct.get("p50_ms", float("nan"))
        added99 = row["p99_ms"] - direct.get("p99_ms", float("nan"))
        lines.append(
            f"| {LABELS[name]} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} "
            f"| {'' if name == 'direct' else _fmt(added50, '.3f')} "
            f"| {'' if name == 'direct' else _fmt(added99, '.3f')} |"
        )
    lines.append("")
    if "exec stream only" in targets:
        lines += [
            "`exec stream only`: the benchmark process itself opens a kuberun exec stream "
            "(Cython relay) into one of the gateways' Pods, no SSH: the API-server hop "
            "(TLS, devcluster, its pty) on its own. `local pty only`: `cat` on a local pty, "
            "no network.",
            "",
        ]
    return lines


def _scale_tables(data: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    steps = data.get("steps", [])
    if steps:
        by_n: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
        for s in steps:
            by_n[s["n"]][s["kind"]] = s
        lines += [
            f"### Concurrent shell sessions (idle CPU over {data['idle_seconds']:.0f} s)",
            "",
            "| connections | opened (gateway / direct) | direct KiB/conn | gateway KiB/conn "
            "| beyond asyncssh KiB/conn | gateway idle CPU % | direct idle CPU % "
            "| devcluster idle CPU % | devcluster processes |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for n in sorted(by_n):
            g = by_n[n].get("gateway", {})
            d = by_n[n].get("direct", {})
            g_kib = g.get("rss_per_conn", float("nan")) / 1024
            d_kib = d.get("rss_per_conn", float("nan")) / 1024
            lines.append(
                f"| {n} | {g.get('opened', 0)} / {d.get('opened', 0)} | {_fmt(d_kib, '.1f')} "
                f"| {_fmt(g_kib, '.1f')} | {_fmt(g_kib - d_kib, '.1f')} "
                f"| {_fmt(g.get('idle_cpu_pct', float('nan')))} "
                f"| {_fmt(d.get('idle_cpu_pct', float('nan')))} "
                f"| {_fmt(g.get('cluster_idle_cpu_pct', float('nan')))} "
                f"| {g.get('cluster_processes')} |"
            )
        lines.append("")
    churn = data.get("churn")
    if churn:
        verbs = ", ".join(
            f"{k} {v / max(churn['done'], 1):.2f}"
            for k, v in sorted(churn["api_calls_by_verb"].items())
        )
        lines += [
            f"### Connection churn ({churn['connections']} connections, "
            f"{churn['concurrency']} at a time)",
            "",
            "| connections/s (until Pods deleted) | p50 connection s | gateway CPU ms/conn "
            "| devcluster CPU ms/conn | API calls/conn | by kind |",
            "|---:|---:|---:|---:|---:|---|",
            f"| {churn['per_second']:.1f} | {churn['connection_p50_s']:.3f} "
            f"| {churn['gateway_cpu_ms_per_conn']:.1f} | {churn['cluster_cpu_ms_per_conn']:.1f} "
            f"| {churn['api_calls_per_conn']:.2f} | {verbs} |",
            "",
        ]
        if churn["failed"]:
            lines += [f"{churn['failed']} connections failed: {churn['errors']}", ""]
    return lines


def _check(ok: bool) -> str:
    return "holds" if ok else "MISSED"


def _targets(data: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    lines = ["### Targets (ratios from this run)", ""]
    down = summary.get("down", {})
    up = summary.get("up", {})
    cy_d, cy_u = down.get("cython"), up.get("cython")
    if cy_d and "ratio" in cy_d:
        lines.append(
            f"- download ≥ 0.90 of direct: {cy_d['ratio']:.2f} — {_check(cy_d['ratio'] >= 0.90)}"
        )
        lines.append(
            f"- gateway CPU/GiB down ≤ 1.10x direct: {cy_d['cpu_ratio']:.2f}x — "
            f"{_check(cy_d['cpu_ratio'] <= 1.10)}"
        )
    if cy_u and "ratio" in cy_u:
        lines.append(
            f"- upload ≥ 0.85 of direct: {cy_u['ratio']:.2f} — {_check(cy_u['ratio'] >= 0.85)}"
        )
        lines.append(
            f"- gateway CPU/GiB up ≤ 1.15x direct: {cy_u['cpu_ratio']:.2f}x — "
            f"{_check(cy_u['cpu_ratio'] <= 1.15)}"
        )
    for direction, table in (("down", down), ("up", up)):
        cy, base = table.get("cython"), table.get("aiohttp")
        if cy and base and "overhead" in cy and base["overhead"] > 0:
            share = cy["overhead"] / base["overhead"]
            lines.append(
                f"- Cython relay overhead ≤ 1/3 of the aiohttp baseline's ({direction}): "
                f"{cy['overhead']:.2f} vs {base['overhead']:.2f} s/GiB = {share:.2f} — "
                f"{_check(share <= 1 / 3)}"
            )
    if data.get("streams"):
        stream_summary = summarize_streams(data["streams"])
        for direction in ("down", "up"):
            share = _relay_share(stream_summary, direction)
            if share is None:
                continue
            cy_cost, base_cost, ratio = share
            precise = _relay_share(stream_summary, direction, "self_cost")
            clock = (
                f" (consumer's own CPU clock: {precise[0]:.3f} vs {precise[1]:.3f} = "
                f"{_fmt(precise[2])})"
                if precise is not None
                else ""
            )
            lines.append(
                "- Cython relay cost over the TLS floor ≤ 1/3 of the aiohttp baseline's "
                f"({direction}): {cy_cost:.2f} vs {base_cost:.2f} s/GiB = {_fmt(ratio)} — "
                f"{_check(ratio <= 1 / 3)}{clock}"
            )
    lat = data.get("latency", {}).get("targets", {})
    if "cython" in lat and "direct" in lat:
        added = lat["cython"]["p50_ms"] - lat["direct"]["p50_ms"]
        lines.append(f"- keystroke added p50 ≤ 0.3 ms: {added:.3f} ms — {_check(added <= 0.3)}")
    steps = data.get("scale", {}).get("steps", [])
    by_n: dict[int, dict[str, Any]] = defaultdict(dict)
    for s in steps:
        by_n[s["n"]][s["kind"]] = s
    if 1000 in by_n and {"gateway", "direct"} <= by_n[1000].keys():
        g, d = by_n[1000]["gateway"], by_n[1000]["direct"]
        beyond = (g["rss_per_conn"] - d["rss_per_conn"]) / 1024
        lines.append(
            f"- 1,000 sessions ≤ 100 KiB/conn beyond asyncssh: {beyond:.1f} KiB "
            f"({g['opened']} opened) — {_check(beyond <= 100 and g['opened'] == 1000)}"
        )
        lines.append(
            f"- idle CPU with 1,000 sessions < 2% of a core: {g['idle_cpu_pct']:.2f}% — "
            f"{_check(g['idle_cpu_pct'] < 2)}"
        )
    lines.append("")
    return lines


def render(data: dict[str, Any]) -> str:
    machine = data.get("machine", {})
    lines = [
        "## kuberun end-to-end benchmark",
        "",
        f"Machine: {machine.get('cpu')}, {machine.get('cores')} cores, {machine.get('memory')}, "
        f"Linux {machine.get('kernel')}, Python {machine.get('python')}, "
        f"{machine.get('openssh')}; load average at start {machine.get('loadavg_at_start')}.",
        "Versions: "
        + ", ".join(f"{k} {v}" for k, v in sorted(machine.get("versions", {}).items())),
        "",
    ]
    summary: dict[str, Any] = {}
    if data.get("throughput"):
        summary = summarize_throughput(data["throughput"])
        rounds = int(max(r["rounds"] for t in summary.values() for r in t.values()))
        size = data["throughput"][0]["size"]
        lines += [
            f"Throughput: {size / GIB:g} GiB per transfer, OpenSSH client, aes128-gcm, "
            f"medians of {rounds} rounds (ratios are per round, then the median).",
            "",
        ]
        lines += [
            "CPU is user+system time from /proc/PID/stat of each process alone, per GiB moved. "
            "Overhead = server CPU minus the direct server's in the same round. "
            "The CPU ceiling is the fastest these CPU costs allow on two cores: the server, "
            "devcluster and the ssh client together get at most 2 CPU-seconds per second and "
            "each at most 1 (head/cat not counted).",
            "",
        ]
        lines += _throughput_tables(summary)
    if data.get("streams"):
        lines += _streams_tables(data["streams"])
    if data.get("latency"):
        lines += _latency_table(data["latency"])
    if data.get("scale"):
        lines += _scale_tables(data["scale"])
    if data.get("audit"):
        from .audit import render as render_audit

        lines += render_audit(data["audit"])
    lines += _targets(data, summary)
    return "\n".join(lines)
