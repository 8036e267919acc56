"""Run the reliability suite and summarise its figures.

    .venv/bin/python benchmarks/reliability_report.py            # fast subset (what CI runs by default)
    .venv/bin/python benchmarks/reliability_report.py --full     # + the reliability_full tests (20 kill trials, ...)

Runs ``pytest tests/reliability`` with ``QUANTPIPE_RELIABILITY_FIGURES`` pointing at a JSON-lines file that the
tests append their counts to, then prints a summary table and writes ``benchmarks/results/reliability.json`` and
``reliability.md``: kill trials survived / total, faults injected / survived, corruptions detected / injected,
bad inputs rejected cleanly / tried, concurrency runs, security checks, artifacts lost. Exit status is pytest's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def _sum(records: list[dict[str, Any]], key: str) -> int:
    return int(sum(r.get(key, 0) or 0 for r in records))


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by[r["category"]].append(r)
    kills = [r for r in by["kill"] if r["test"] in ("fast", "full")]
    init = [r for r in by["kill"] if r["test"] == "mlflow-db-init"]
    kill_points: dict[str, int] = defaultdict(int)
    for r in kills:
        for k, v in (r.get("kill_points") or {}).items():
            kill_points[k] += v
    lost = _sum(kills, "lost")
    return {
        "kill_trials": {
            "survived": _sum(kills, "survived"),
            "total": _sum(kills, "trials"),
            "resumes_reused_work": _sum(kills, "resumes_reused_work"),
            "finished_before_kill": _sum(kills, "finished_before_kill"),
            "artifacts_committed_before_kill": _sum(kills, "artifacts_committed_before_kill"),
            "mismatches": _sum(kills, "mismatches"),
            "torn": _sum(kills, "torn"),
            "recomputed_after_commit": _sum(kills, "recomputed_after_commit"),
            "kill_points": dict(sorted(kill_points.items())),
            "mlflow_db_init_kills": {"survived": _sum(init, "survived"), "total": _sum(init, "trials")},
        },
        "faults": {
            "injected": _sum(by["fault"], "injected"),
            "survived": _sum(by["fault"], "survived"),
            "scenarios": len(by["fault"]),
            "scenarios_ok": sum(1 for r in by["fault"] if r.get("survived") == r.get("injected")),
        },
        "corruption": {
            "detected": _sum(by["corruption"], "detected"),
            "injected": _sum(by["corruption"], "injected"),
            "undetected": _sum(by["corruption"], "injected") - _sum(by["corruption"], "detected"),
        },
        "bad_inputs": {
            "rejected_cleanly": _sum(by["bad-input"], "rejected_cleanly"),
            "tried": _sum(by["bad-input"], "tried"),
            "not_clean": sorted(r["test"] for r in by["bad-input"] if not r.get("rejected_cleanly")),
        },
        "concurrency": {
            "scenarios": len(by["concurrency"]),
            "concurrent_runs": _sum(by["concurrency"], "runs"),
            "distinct_builds": _sum(by["concurrency"], "distinct_builds"),
            "registry_versions": _sum(by["concurrency"], "versions"),
            "torn": _sum(by["concurrency"], "torn"),
            "mismatches": _sum(by["concurrency"], "mismatches"),
        },
        "forgery": {"detected": _sum(by["forgery"], "detected"), "injected": _sum(by["forgery"], "injected")},
        "traversal": {"refused": _sum(by["traversal"], "refused"), "tried": _sum(by["traversal"], "tried")},
        "security": {"passed": _sum(by["security"], "passed"), "checks": _sum(by["security"], "checks")},
        "doctor": {"passed": _sum(by["doctor"], "passed"), "checks": _sum(by["doctor"], "checks")},
        "artifacts_lost": lost,
    }


def _pytest_counts(junit: Path) -> dict[str, int]:
    if not junit.is_file():
        return {}
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {}
    total = int(suite.get("tests", 0))
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    return {"passed": total - failed - skipped, "failed": failed, "skipped": skipped}


def table_rows(s: dict[str, Any]) -> list[tuple[str, str, str]]:
    k, f, c, b = s["kill_trials"], s["faults"], s["corruption"], s["bad_inputs"]
    cc, sec = s["concurrency"], s["security"]
    init = k["mlflow_db_init_kills"]
    return [
        (
            "kill trials survived / total",
            f"{k['survived']} / {k['total']}",
            f"{k['resumes_reused_work']} resumes reused work, {k['mismatches']} mismatches, {k['torn']} torn; "
            f"kills landed in {k['kill_points']}; MLflow-DB-creation kills {init['survived']} / {init['total']}",
        ),
        (
            "faults injected / survived",
            f"{f['injected']} / {f['survived']}",
            f"{f['scenarios_ok']} / {f['scenarios']} scenarios absorbed or failed cleanly, no incomplete manifest",
        ),
        (
            "corruptions detected / injected",
            f"{c['detected']} / {c['injected']}",
            f"{c['undetected']} undetected; every damaged artifact recomputed bit-identically by the pipeline",
        ),
        (
            "bad inputs rejected cleanly / tried",
            f"{b['rejected_cleanly']} / {b['tried']}",
            "one-line error naming the fix, no traceback, store unchanged"
            + (f"; NOT clean: {b['not_clean']}" if b["not_clean"] else ""),
        ),
        (
            "concurrent runs (torn / mismatched)",
            f"{cc['concurrent_runs']} ({cc['torn']} / {cc['mismatches']})",
            f"{cc['distinct_builds']} distinct builds -> {cc['registry_versions']} registry versions",
        ),
        (
            "forged artifacts detected / injected",
            f"{s['forgery']['detected']} / {s['forgery']['injected']}",
            "payload + manifest rewritten consistently, digest removed, config or links forged; unsigned store: "
            "caught through consumers' links, signed store: refused by every read",
        ),
        (
            "path traversal attempts refused / tried",
            f"{s['traversal']['refused']} / {s['traversal']['tried']}",
            "hostile file paths in local and planted S3 manifests; nothing written outside the store or cache",
        ),
        (
            "security checks passed / total",
            f"{sec['passed']} / {sec['checks']}",
            "remote code, pickle, traversal, secrets in logs/MLflow/config, loopback binds",
        ),
        ("artifacts lost", str(s["artifacts_lost"]), ""),
    ]


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Reliability report ({report['mode']})",
        "",
        f"{report['date']} · {report['machine']} · pytest {report['pytest']} · wall {report['runtime_s']} s, "
        f"CPU {report['cpu_s']} s",
        "",
        "| figure | value | notes |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in table_rows(report["summary"])]
    flag = " --full" if report["mode"] == "full" else ""
    lines += [
        "",
        f"Regenerate: `.venv/bin/python benchmarks/reliability_report.py{flag}`",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="also run the reliability_full tests")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for reliability.json / .md")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (e.g. -k kill)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        figures = Path(tmp) / "figures.jsonl"
        junit = Path(tmp) / "junit.xml"
        env = dict(os.environ)
        env["QUANTPIPE_RELIABILITY_FIGURES"] = str(figures)
        if args.full:
            env["QUANTPIPE_RELIABILITY_FULL"] = "1"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
        cmd += ["tests/reliability", *args.pytest_args]
        started = time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        rc = subprocess.call(cmd, cwd=REPO, env=env)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        runtime = time.perf_counter() - started
        records = [json.loads(line) for line in figures.read_text().splitlines()] if figures.is_file() else []
        counts = _pytest_counts(junit)

    summary = summarise(records)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    report = {
        "mode": "full" if args.full else "fast",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, load {load:.1f} at the end",
        "runtime_s": round(runtime, 1),
        "cpu_s": round(cpu, 1),
        "pytest": counts,
        "pytest_exit": rc,
        "summary": summary,
        "records": records,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reliability.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.out / "reliability.md").write_text(render_markdown(report))

    from rich.console import Console
    from rich.table import Table

    table = Table("figure", "value", "notes", title=f"quantpipe reliability ({report['mode']}, {runtime:.0f} s)")
    for row in table_rows(summary):
        table.add_row(*row)
    Console().print(table)
    print(f"pytest: {counts} (exit {rc}); wrote {args.out / 'reliability.json'} and reliability.md")
    return rc


if __name__ == "__main__":
    sys.exit(main())
