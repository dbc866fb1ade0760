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
import math
import os
import shutil
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..checks import output_directory
from ..report import write_atomic

logger = logging.getLogger(__name__)

PROGRESS = "progress.json"


class RestoredLayers(Mapping):
    """The checkpointed layers of a run directory, name -> (weight, mask, record), read from
    their files on access."""

    def __init__(self, resume_dir: Path, records: list[dict], files: list[str]):
        self.resume_dir = resume_dir
        self.entries = {record["name"]: (file, {k: v for k, v in record.items() if k != "name"})
                        for record, file in zip(records, files, strict=True)}

    def __getitem__(self, name: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
        from safetensors.torch import load_file

        file, record = self.entries[name]
        tensors = load_file(self.resume_dir / file)
        return tensors["weight"], tensors["mask"], dict(record)

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def write_streamed(path: Path, shapes: dict[str, list[int]],
                   tensor: Callable[[str], torch.Tensor]) -> None:
    """A safetensors file of the bool tensors `shapes` (name -> shape), each made by
    `tensor(name)` only when its bytes are written: the file is never held in memory whole.
    Written beside `path` and renamed."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        header[name] = {"dtype": "BOOL", "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text)
        for name, shape in shapes.items():
            values = tensor(name)
            if values.dtype != torch.bool or list(values.shape) != list(shape):
                raise ValueError(f"{name}: expected a bool tensor of shape {shape}")
            out.write(values.contiguous().numpy().tobytes())
    os.replace(partial, path)


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

    def restored(self) -> RestoredLayers:
        """name -> (weight, mask, record) of every layer the checkpoint holds, each read from
        its file when asked for (so a resumed run does not hold the model's weights)."""
        return RestoredLayers(self.resume_dir, self.records, self.files)

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

    def write_masks(self, path: Path) -> None:
        """Every checkpointed layer's mask into one safetensors file, one layer read at a
        time (each record holds its layer's shape)."""
        from safetensors import safe_open

        files = {record["name"]: file for record, file in zip(self.records, self.files,
                                                              strict=True)}

        def mask_of(name):
            with safe_open(self.resume_dir / files[name], "pt") as handle:
                return handle.get_tensor("mask")

        write_streamed(path, {record["name"]: record["shape"] for record in self.records},
                       mask_of)

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
