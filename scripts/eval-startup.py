#!/usr/bin/env python3
"""How long ``fairseq-agg-eval`` takes to refuse a bad input: the start-up of the command
(importing torch, fairseq and the plug-in) and the refusal of a missing data folder, as medians
over --repeat runs, and their difference, the input checks' own cost.

    python scripts/eval-startup.py --repeat 5

The tests assert that a refusal comes before the model is loaded, never how long it takes: the
numbers depend on the machine and on what else runs on it (measure on an idle one).
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def seconds(argv, repeat, expected):
    """Median wall time of ``argv``, each run checked to end with ``expected`` on stderr ("" for
    none), so that a command failing otherwise is not timed as if it had refused."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        proc = subprocess.run(argv, cwd=str(REPO), capture_output=True, text=True, check=False)
        times.append(time.perf_counter() - start)
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        if expected not in last or (proc.returncode == 0) != (expected == ""):
            sys.exit(f"eval-startup.py: {' '.join(argv[:4])} ... exited with {proc.returncode}: {last}")
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each command (default: %(default)s)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        refusal = [sys.executable, "-m", "fairseq_agg.eval", "lm", str(Path(tmp) / "no-such-data-bin"),
                   "--path", str(Path(tmp) / "checkpoint.pt"), "--out", str(Path(tmp) / "out")]
        startup = seconds([sys.executable, "-c", "import fairseq_agg.eval"], args.repeat, "")
        refused = seconds(refusal, args.repeat, "no-such-data-bin does not exist")
    print(f"start-up (import fairseq_agg.eval): {startup:.2f} s")
    print(f"refusal of a missing data folder:    {refused:.2f} s ({refused - startup:+.2f} s beyond the start-up)")


if __name__ == "__main__":
    main()
