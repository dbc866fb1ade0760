"""The work directory of one `icbs prune --out OUT` run: atomic results, resumable progress.

Everything is written into `.OUT.partial` beside OUT. After every pruned layer its weights and
mask go into `resume/layer-NNNN.safetensors` and `resume/progress.json` (the commit point,
replaced atomically) lists the layers done with their records, so a run killed at any moment
leaves a consistent checkpoint; `--resume` loads it and continues with the next layer. At the
end the results are written beside it, `resume/` is removed and the directory takes OUT's
place: OUT holds either the old results or the new ones, never a mixture (a kill between
the two renames of the swap leaves the old results in `.OUT.old` and the new ones complete in
`.OUT.partial`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ..checks import output_directory
from ..report import write_atomic

logger = logging.getLogger(__name__)

PROGRESS = "progress.json"


class RunDirectory:
    """`identity` (settings, model, data) must match for a resume to use the checkpoint.
    Creating one only checks and reads; the first checkpointed layer makes the first write,
    so a run refused by a check before any layer is pruned leaves nothing behind."""

    def __init__(self, out: str | Path, identity: dict, resume: bool):
        self.out = Path(out)
        output_directory("--out", self.out)
        self.work = self.out.with_name(f".{self.out.name}.partial")
        self.resume_dir = self.work / "resume"
        self.identity = json.loads(json.dumps(identity))
        self.records: list[dict] = []
        self.files: list[str] = []
        progress = self.resume_dir / PROGRESS
        self.resuming = resume and progress.is_file()
        self.started = False
        if self.resuming:
            try:
                state = json.loads(progress.read_text())
                self.records, self.files = list(state["records"]), list(state["files"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"--resume: {progress} cannot be read ({exc}); run without "
                                 f"--resume to start again") from None
            if state.get("identity") != self.identity:
                raise ValueError(
                    f"--resume: {self.work} was started with other settings, model or data "
                    f"({state.get('identity')}); run without --resume to start again")
        elif resume:
            logger.warning("--resume: no checkpoint in %s; starting from the beginning",
                           self.work)

    def _start(self) -> None:
        """Create the work directory (the run's first write), unless resuming into it."""
        self.started = True
        if self.resuming:
            logger.warning("resuming %s after %d pruned layers", self.out, len(self.records))
            return
        if self.work.exists():
            logger.warning("discarding the unfinished run in %s (--resume continues one)",
                           self.work)
            shutil.rmtree(self.work)
        self.resume_dir.mkdir(parents=True)
        self._commit()

    def open(self) -> Path:
        """The work directory, created (or, resuming, kept) now; the run's results are
        written into it."""
        if not self.started:
            self._start()
        return self.work

    def restored(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, dict]]:
        """name -> (weight, mask, record) of every layer the checkpoint holds."""
        from safetensors.torch import load_file

        done = {}
        for record, name in zip(self.records, self.files, strict=True):
            tensors = load_file(self.resume_dir / name)
            done[record["name"]] = (tensors["weight"], tensors["mask"],
                                    {k: v for k, v in record.items() if k != "name"})
        return done

    def save_layer(self, name: str, weight: torch.Tensor, mask: torch.Tensor,
                   record: dict) -> None:
        """Checkpoint one pruned layer (its file first, then the progress that lists it)."""
        from safetensors.torch import save

        self.open()
        file = f"layer-{len(self.files):04d}.safetensors"
        write_atomic(self.resume_dir / file, save({"weight": weight.detach().cpu().contiguous(),
                                                   "mask": mask.cpu().contiguous()}))
        self.records.append({"name": name, **record})
        self.files.append(file)
        self._commit()

    def _commit(self) -> None:
        write_atomic(self.resume_dir / PROGRESS, json.dumps(
            {"identity": self.identity, "records": self.records, "files": self.files},
            indent=1).encode())

    def finish(self, write: Callable[[Path], None]) -> None:
        """`write(directory)` puts the results into the work directory, which then replaces
        OUT (an old OUT is moved aside first and removed last)."""
        self.open()
        write(self.work)
        shutil.rmtree(self.resume_dir)
        old = self.out.with_name(f".{self.out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if self.out.exists():
            os.replace(self.out, old)
        os.replace(self.work, self.out)
        shutil.rmtree(old, ignore_errors=True)
