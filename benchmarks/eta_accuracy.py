"""How honest the progress display's ETA and `rcit-bench estimate` are, against what a run really took.

Two figures, printed side by side:
- the ETA at every progress event of a finished run (its ``<results>/<spec>/progress.jsonl``) against the time
  that really remained; the target is within 2x at every event after the first entry has trained (events with
  under a minute left are listed but not judged: there a few seconds of difference make a large ratio);
- with ``--run SPEC``: ``rcit-bench estimate`` (unit costs measured afresh) and then ``rcit-bench bench`` of that
  spec in a new results directory, the estimate against the run's own time and the command's wall time.

    python benchmarks/eta_accuracy.py --trace runs/quick/progress.jsonl
    python benchmarks/eta_accuracy.py --run benchmarks/smoke.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rcit_bench.bench.costs import fmt_s  # noqa: E402
from rcit_bench.utils import machine_header  # noqa: E402

JUDGED_FROM_S = 60.0  # remaining time below which an event is listed but not judged


def eta_table(trace: Path) -> int:
    rows = [json.loads(line) for line in trace.read_text().splitlines() if line.strip()]
    end = next((r["elapsed_s"] for r in reversed(rows) if r["event"] == "done"), None)
    if end is None:
        sys.stderr.write(f"{trace} has no 'done' event: the run did not finish.\n")
        return 2
    trained = next((i for i, r in enumerate(rows) if " trained in " in r["event"]), None)
    print(f"{'elapsed':>8} {'ETA':>8} {'actual':>8} {'ratio':>6}  event")
    worst = []
    for i, r in enumerate(rows[:-1]):
        left = end - r["elapsed_s"]
        eta = r["eta_s"]
        ratio = None if eta is None or left <= 0 else eta / left
        judged = trained is not None and i >= trained and left >= JUDGED_FROM_S and ratio is not None
        if judged:
            worst.append(max(ratio, 1 / ratio) if ratio > 0 else float("inf"))
        mark = "" if judged else " (not judged)"
        print(f"{fmt_s(r['elapsed_s']):>8} {fmt_s(eta):>8} {fmt_s(left):>8} "
              f"{'-' if ratio is None else f'{ratio:.2f}':>6}  {r['event'][:90]}{mark}")
    print(f"\nrun took {fmt_s(end)}; {len(worst)} events judged (after the first entry trained, >= "
          f"{JUDGED_FROM_S:.0f} s left); worst factor off: {max(worst):.2f}x" if worst else "no event judged")
    return 0


def run_and_compare(spec: str) -> int:
    env = {**os.environ, "WANDB_SILENT": "true"}
    cli = [sys.executable, "-m", "rcit_bench.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        res, board = Path(tmp) / "runs", Path(tmp) / "board"
        est = subprocess.run([*cli, "estimate", spec, "--results-dir", str(res), "--measure"], env=env,
                             capture_output=True, text=True, check=True)
        m = re.search(r"= (\S+) \(training at its maximum", est.stdout)
        print(est.stdout)
        t = time.perf_counter()
        run = subprocess.run([*cli, "bench", spec, "--results-dir", str(res), "--leaderboard-dir", str(board)],
                             env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if run.returncode != 0:
            sys.stderr.write(run.stderr[-3000:])
            return run.returncode
        trace = next(res.glob("*/progress.jsonl"))
        end = json.loads(trace.read_text().splitlines()[-1])["elapsed_s"]
        print(f"estimate (unit costs measured afresh): {m.group(1) if m else '?'}")
        print(f"the run's own time (from its start to its report, unit costs read from the estimate's cache): "
              f"{fmt_s(end)} ({end:.1f} s)")
        print(f"`rcit-bench bench` wall time, interpreter start-up and exit included: {fmt_s(wall)} ({wall:.1f} s)")
        print("\nETA during that run:")
        return eta_table(trace)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, help="progress.jsonl of a finished run")
    ap.add_argument("--run", help="spec to estimate and then run (in a temporary results directory)")
    args = ap.parse_args()
    print(machine_header())
    if args.run:
        return run_and_compare(args.run)
    if args.trace:
        return eta_table(args.trace)
    ap.error("pass --trace or --run")
    return 2


if __name__ == "__main__":
    sys.exit(main())
