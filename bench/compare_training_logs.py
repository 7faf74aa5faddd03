"""Are two runs the same computation? Compare their training.csv logs row by row, every column but the timings.

    python bench/compare_training_logs.py results/4a/<cell>/training.csv runs/<rerun>/training.csv

Prints the first iteration (or step) at which a logged value differs, or that the common rows are identical. A run
repeated with the same command, threads and CPU type should be identical bit for bit (docs/diagnosis.md point 27);
another thread count changes the summation order and shows up at the first row. Exit status 1 when they differ.
"""

import csv
import sys

TIMINGS = {"wall_time_s", "sps"}


def first_difference(a_rows: list, b_rows: list) -> tuple:
    """(index of the first differing row or None, the differing columns as (name, a, b), rows compared)."""
    n = min(len(a_rows), len(b_rows))
    for i in range(n):
        diff = [(k, a_rows[i][k], b_rows[i].get(k)) for k in a_rows[i] if k not in TIMINGS and a_rows[i][k] != b_rows[i].get(k)]
        if diff:
            return i, diff, n
    return None, [], n


def main(a_path: str, b_path: str) -> int:
    a_rows, b_rows = (list(csv.DictReader(open(p))) for p in (a_path, b_path))
    i, diff, n = first_difference(a_rows, b_rows)
    if i is None:
        print(f"identical in all {n} common rows (every logged column but {', '.join(sorted(TIMINGS))})")
        return 0
    key = next(iter(a_rows[i]))
    print(f"first difference at {key} {a_rows[i][key]}: " + ", ".join(f"{k} {x} vs {y}" for k, x, y in diff[:6]))
    return 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
