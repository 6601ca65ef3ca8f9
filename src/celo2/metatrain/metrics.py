"""The meta-training metrics file: ``metrics.jsonl`` or ``metrics.csv``, one row per outer iteration."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Callable

from celo2._io import atomic_write_bytes
from celo2.metatrain.run_folder import RunDirError


class MetricsWriter:
    """Appends rows as JSON lines or CSV; flushed at checkpoints."""

    FIELDS = ("iteration", "meta_loss", "grad_norm", "inner_steps_per_s", "wall_time_s",
              "resets", "nonfinite_losses")

    def __init__(self, path: Path, fmt: str):
        self.fmt = fmt
        new = not path.exists() or path.stat().st_size == 0
        self.fh = open(path, "a", newline="")
        self.csv = None
        if fmt == "csv":
            self.csv = csv.DictWriter(self.fh, fieldnames=self.FIELDS)
            if new:
                self.csv.writeheader()

    def write(self, row: dict) -> None:
        if self.csv is not None:
            self.csv.writerow(row)
        else:
            self.fh.write(json.dumps(row) + "\n")

    def flush(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.flush()
        self.fh.close()


def read_metrics(run_dir: str | os.PathLike, warn: Callable[[str], None] | None = None) -> list[dict]:
    """The metrics rows of a run folder (JSON lines or CSV).

    Args:
        run_dir: the run folder.
        warn: called with a message naming the file and line of each line that is not a metrics
            row (a line cut short by a kill, or damaged); such lines are skipped either way.

    Returns:
        The rows, in file order.

    Raises:
        RunDirError: the folder has no metrics file.
    """
    run = Path(run_dir)

    def bad(path: Path, lineno: int, text: str) -> None:
        if warn is not None:
            warn(f"warning: {path}:{lineno}: not a metrics row, skipped: {text[:80]!r}")

    if (run / "metrics.jsonl").exists():
        path = run / "metrics.jsonl"
        rows = []
        for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            try:
                row = json.loads(line)
                int(row["iteration"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                bad(path, lineno, line)
                continue
            rows.append(row)
        return rows
    if (run / "metrics.csv").exists():
        path = run / "metrics.csv"
        with open(path, newline="", errors="replace") as fh:
            rows = []
            reader = csv.DictReader(fh)
            for r in reader:
                try:
                    row = {k: float(v) for k, v in r.items()}
                    int(row["iteration"])
                except (TypeError, ValueError, KeyError, AttributeError):
                    bad(path, reader.line_num, ",".join(str(v) for v in r.values()))
                    continue
                rows.append(row)
            return rows
    raise RunDirError(f"{run}: no metrics.jsonl or metrics.csv (is this a meta-train run folder?)")


def truncate_metrics(path: Path, iteration: int, log: Callable[[str], None]) -> None:
    """Drop rows after ``iteration`` (logged by a killed run after its last checkpoint).

    Lines that are not metrics rows are dropped from the file, with a warning
    naming each: a row that cannot be parsed cannot be plotted or resumed from,
    and rows after the checkpoint are computed again anyway. Their text is kept
    in ``RUN_DIR/metrics.rejected.txt``, so nothing is destroyed.
    """
    if not path.exists():
        return
    rejected: list[str] = []

    def warn(msg: str) -> None:
        rejected.append(msg)
        log(msg)

    try:
        rows = [r for r in read_metrics(path.parent, warn) if int(r["iteration"]) <= iteration]
    except RunDirError:
        return
    if rejected:
        with open(path.parent / "metrics.rejected.txt", "a") as fh:
            fh.write("".join(m + "\n" for m in rejected))
    buf = io.StringIO()
    if path.suffix == ".csv":
        w = csv.DictWriter(buf, fieldnames=MetricsWriter.FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (int(r[k]) if k in ("iteration", "resets", "nonfinite_losses") else r[k])
                        for k in MetricsWriter.FIELDS if k in r})
    else:
        for r in rows:
            buf.write(json.dumps(r) + "\n")
    atomic_write_bytes(path, buf.getvalue().encode())
