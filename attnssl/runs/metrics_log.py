"""The run's step metrics as CSV, appended as training goes and cut back on resume."""

from __future__ import annotations

import csv
from pathlib import Path


class MetricsLog:
    """``metrics.csv``: one row per logged step; columns fixed by the first row written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fields: list[str] | None = None  # the header, read once

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as handle:
            return list(csv.DictReader(handle))

    def truncate_after(self, step: int) -> None:
        """Drop rows past ``step``: a resumed run logs those steps again."""
        rows = self.read()
        kept = [r for r in rows if int(r["step"]) <= step]
        if len(kept) == len(rows):
            return
        if not kept:
            self.path.unlink()
            return
        with open(self.path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(kept[0]))
            writer.writeheader()
            writer.writerows(kept)

    def append(self, step: int, values: dict) -> None:
        row = {"step": step, **values}
        new = not self.path.is_file()
        if new:
            self._fields = list(row)
        elif self._fields is None:
            with open(self.path, newline="") as handle:
                self._fields = next(csv.reader(handle))
        with open(self.path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self._fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
