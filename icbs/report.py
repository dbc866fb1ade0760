"""What a run did: settings, per-step trace, per-layer sparsity, timings; as JSON."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class StepRecord:
    """One block step: when it ended (seconds into the run), where, what it estimated."""

    step: int
    time: float
    layer: str
    block_size: int
    delta: float
    accepted: bool
    solver_time: float
    estimate_time: float
    objective: float
    solver_info: dict = field(default_factory=dict)


@dataclass
class Report:
    settings: dict[str, Any]
    layers: list[dict[str, Any]]
    trace: list[StepRecord]
    timings: dict[str, float]
    objective: dict[str, float]

    @property
    def steps(self) -> int:
        return len(self.trace)

    @property
    def accepted(self) -> int:
        return sum(r.accepted for r in self.trace)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write the report as JSON (atomically)."""
        write_atomic(Path(path), json.dumps(self.to_dict(), indent=1).encode())


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_csv(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Write rows (dicts with the same keys) as a CSV file with a header, atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(Path(path), buffer.getvalue().encode())
