"""End-to-end benchmarks: the gateway (against devcluster) versus a direct asyncssh server.

Run everything with ``make bench-e2e`` (or ``python -m benchmarks.e2e --help``).
Each server runs in its own process so ``/proc/PID/stat`` isolates its CPU time.
Nothing here is part of ``make test``; see ``benchmarks/RESULTS.md``.
"""
