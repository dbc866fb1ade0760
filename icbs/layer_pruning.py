"""One layer at a time: the settings of a layer-by-layer run and its per-layer callback.

`LayerPruner` prunes one Linear or Conv2d layer, given the statistics of its inputs in the
model pruned so far, by one method: magnitude, Wanda, SparseGPT, ALPS, or iCBS block steps
on the layer's reconstruction error (`icbs.layerwise.improve_layer`) from one of them. The
drivers that feed it are `icbs.sequential` (any model) and `icbs.llm.sequential` (decoder
blocks of a causal LM).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .baselines import alps_prune, magnitude_mask, sparsegpt_prune, wanda_mask
from .checks import finite_at_least, integer_at_least, one_of
from .distributed import LocalExecutor
from .layer_stats import InputCovariance, dense_output_error, dense_target
from .layerwise import OBJECTIVES
from .masks import check_layer, mask_matches_pattern, parse_pattern
from .reconstruct import reconstruct_rows, reconstruction_error
from .refit_steps import BATCH_ELEMENTS
from .settings import PruneSettings
from .threads import set_threads

METHODS = ("magnitude", "wanda", "sparsegpt", "alps", "icbs")
INITS = ("wanda", "sparsegpt", "alps")
BUDGET_SHARES = ("weights", "error", "error+blocks")


@dataclass(frozen=True)
class SequentialSettings(PruneSettings):
    """How each layer is pruned (the fields of `icbs.settings.PruneSettings`, and these);
    names follow Wanda / SparseGPT / llm-compressor. Raises ValueError when made with a bad
    value."""

    method: str = "icbs"
    budget: float = 600.0  # seconds of iCBS block steps over the whole model
    init: str = "wanda"  # iCBS start
    reconstruct: bool = False
    sparsegpt_columns: int = 128  # SparseGPT's lazy-update column block (its `blocksize`)
    percdamp: float = 0.01  # damping, fraction of mean(diag H)
    mask_damp: float = 0.1  # iCBS mask steps: ridge on H, fraction of mean(diag H)
    objective: str = "layerwise"  # iCBS block steps: "layerwise" (kept weights frozen), "refit"
    steps: int | None = None  # iCBS block steps over the whole model instead of `budget`
    budget_share: str = "weights"  # a layer's part of the budget: by its weight count, or
    # by the start error of the layer in its place in the block before ("error"), and the
    # blocks' parts by a forecast of their errors ("error+blocks", LLMs: `block_forecast`)
    batched_steps: bool = False  # layerwise steps: a block in each row of a batch at once
    dense_targets: bool = False  # fit each layer to the dense model's outputs
    target_damp: float = 0.1  # dense targets: ridge toward the dense weights, x mean(diag H)
    true_sequential: bool = False  # a stage's layers group by group in call order (an LLM
    # block's always with dense targets)
    refit_batch_elements: int = BATCH_ELEMENTS  # refit steps: stacked-inverse entries a batch
    # of rows holds (`icbs.refit_steps.rows_per_batch`)

    def __post_init__(self):
        super().__post_init__()
        one_of("method", self.method, METHODS)
        one_of("objective", self.objective, OBJECTIVES)
        one_of("init", self.init, INITS)
        one_of("budget_share", self.budget_share, BUDGET_SHARES)
        integer_at_least("sparsegpt_columns", self.sparsegpt_columns, 1)
        integer_at_least("refit_batch_elements", self.refit_batch_elements, 1)
        if self.steps is not None:
            integer_at_least("steps", self.steps, 1)
        if self.batched_steps and self.pattern == "unstructured":
            raise ValueError("batched_steps needs a per-row count: pattern per_output or N:M, "
                             "not unstructured (one count per layer)")
        for name in ("budget", "percdamp", "mask_damp", "target_damp"):
            finite_at_least(name, getattr(self, name))
        if self.dense_targets and not self.needs_calibration:
            raise ValueError("dense_targets fits layers to calibration outputs: use a method "
                             "other than magnitude, or reconstruct")

    @property
    def needs_calibration(self) -> bool:
        return self.method != "magnitude" or self.reconstruct


def overall_sparsity(records: list[dict]) -> float:
    """The pruned fraction of all the weights in `LayerPruner` records."""
    sizes = [r["shape"][0] * r["shape"][1] for r in records]
    return sum(r["sparsity"] * n for r, n in zip(records, sizes, strict=True)) / sum(sizes)


def _place(name: str) -> str:
    """A layer's place in its block: its name with the block index (a number between dots)
    left out, e.g. model.layers.#.mlp.down_proj."""
    return re.sub(r"\.\d+\.", ".#.", name)


class Interrupted(Exception):
    """Raised after the layer during which a stop was requested (Ctrl-C) was finished."""


def _start(settings: SequentialSettings, pattern, w0: torch.Tensor, cov: InputCovariance | None):
    start = settings.init if settings.method == "icbs" else settings.method
    if start == "magnitude":
        mask = magnitude_mask(w0, settings.sparsity, pattern)
    elif start == "wanda":
        mask = wanda_mask(w0, cov.column_norms(), settings.sparsity, pattern)
    elif start == "alps":
        return alps_prune(w0, cov.hessian, settings.sparsity, pattern, damp=settings.percdamp)
    else:
        return sparsegpt_prune(w0, cov.hessian, settings.sparsity, pattern,
                               settings.sparsegpt_columns, settings.percdamp)
    return w0 * mask, mask


def start_weight(settings: SequentialSettings, w0: torch.Tensor,
                 cov: InputCovariance | None):
    """(weight, mask, record) of the settings' one-shot start on one weight matrix."""
    tic = time.perf_counter()
    weight, mask = _start(settings, parse_pattern(settings.pattern), w0, cov)
    record = {"seconds_start": time.perf_counter() - tic}
    if cov is not None:
        record["error_before"] = float(reconstruction_error(w0, weight, cov.hessian).sum())
    return weight, mask, record


def improve_weight(settings: SequentialSettings, w0: torch.Tensor,
                   hessian: torch.Tensor | None, weight: torch.Tensor, mask: torch.Tensor,
                   seconds: float | None, steps: int | None):
    """(weight with zeros where pruned, mask, record) after the settings' iCBS steps (or
    refit) from a start; rows are independent here, so the rows of a layer may be improved
    in parts (per_output, N:M)."""
    s = settings
    pattern = parse_pattern(s.pattern)
    record = {}
    if s.method == "icbs":
        from .layerwise import improve_layer

        result = improve_layer(
            w0, hessian, mask, weight=weight, pattern=pattern, sparsity=s.sparsity,
            seconds=seconds, steps=steps, block_size=s.block_size, solver=s.solver,
            seed=s.seed, reconstruct=s.reconstruct, damp=s.percdamp, mask_damp=s.mask_damp,
            objective=s.objective, batched=s.batched_steps,
            batch_elements=s.refit_batch_elements)
        weight, mask = result.weight.float(), result.mask
        record.update(steps=result.steps, accepted=result.accepted,
                      seconds_icbs=result.seconds, seconds_steps=result.step_seconds)
        if result.convergence:
            record["convergence"] = result.convergence
    elif s.reconstruct:
        tic = time.perf_counter()
        weight = reconstruct_rows(w0, weight, hessian, mask, s.percdamp)
        record["seconds_reconstruct"] = time.perf_counter() - tic
    if not mask_matches_pattern(mask.cpu(), pattern, s.sparsity):
        raise AssertionError(f"mask does not satisfy pattern {pattern}")
    weight = weight * mask
    if hessian is not None:
        record["error_after"] = float(reconstruction_error(w0, weight, hessian).sum())
    return weight, mask, record


def _solve(settings: SequentialSettings, w0: torch.Tensor, cov: InputCovariance | None,
           seconds: float | None, steps: int | None):
    """(weight with zeros where pruned, mask, record) of one weight matrix."""
    weight, mask, record = start_weight(settings, w0, cov)
    weight, mask, improved = improve_weight(settings, w0, None if cov is None else cov.hessian,
                                            weight, mask, seconds, steps)
    return weight, mask, {**record, **improved}


def _merge(records: list[dict], rows: list[int]) -> dict:
    """One record of a layer solved in row parts (groups of a grouped convolution, row
    parts on workers): counts, times and errors summed (a layer's error is the sum of its
    rows'), the convergence's fractions weighted by rows."""
    merged = {key: sum(r[key] for r in records) for key in records[0] if key != "convergence"}
    if "convergence" in records[0]:
        merged["convergence"] = {
            key: sum(r["convergence"][key] * (1 if isinstance(value, int) else n / sum(rows))
                     for r, n in zip(records, rows, strict=True))
            for key, value in records[0]["convergence"].items()}
    return merged


@torch.no_grad()
def prune_weight(settings: SequentialSettings, w0: torch.Tensor,
                 cov: InputCovariance | list[InputCovariance] | None,
                 seconds: float | None = None, steps: int | None = None):
    """(weight, mask, record) of one (rows, cols) weight matrix pruned by the settings'
    method given its input statistics (a list, one per group, for a grouped convolution:
    each group of output rows is pruned on its own inputs, with the pattern's counts per
    group); iCBS gets `seconds` and/or `steps` of block steps. A pure function of its
    arguments: the job a worker runs (`icbs.distributed`)."""
    if not isinstance(cov, list):
        return _solve(settings, w0, cov, seconds, steps)
    rows = w0.shape[0] // len(cov)
    share = [None if x is None else x / len(cov) for x in (seconds, steps)]
    parts = [_solve(settings, w0[g * rows:(g + 1) * rows], c, share[0],
                    None if share[1] is None else max(1, round(share[1])))
             for g, c in enumerate(cov)]
    record = {**_merge([p[2] for p in parts], [rows] * len(cov)), "groups": len(cov)}
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), record


def layer_job(kind: str, *args):
    """The jobs an executor runs: "prune" (`prune_weight`), "start" (`start_weight`) or
    "improve" (`improve_weight`), each a pure function of its arguments. The solvers' numba
    threads follow torch's (a Ray worker gets torch threads for its CPUs, numba all cores)."""
    set_threads(torch.get_num_threads())
    return {"prune": prune_weight, "start": start_weight, "improve": improve_weight}[kind](*args)


class LayerPruner:
    """The callback of both drivers (`icbs.sequential.prune_in_stages` calls it per layer,
    `icbs.llm.sequential.prune_sequential` per decoder block, `prune_block`) for one method;
    keeps the masks.

    A block's layers are independent jobs (`prune_weight`) for the `executor`
    (`icbs.distributed`; default: one after another in this process). iCBS's budget is
    shared out over the layers by weight count (`shapes` holds every prunable layer's (rows,
    cols)) or, with `budget_share="error"`, by the start error of the layer in the same
    place of the block before (`_place`: the name without its block index), over the mean
    error per weight of that block (the first block goes by weight count); with
    `block_forecast` (block prefix -> (forecast error, weights), set for "error+blocks" by
    `icbs.llm.prune.prune_model`) a block's part is its forecast error's, not its weights'
    share of the model's; the shares are multiplied
    by the executor's parallelism, so that the wall time over the model stays about
    `budget` however many workers run the jobs; a step budget (`settings.steps`) is
    shared out the same way but not multiplied, so the result does not depend on the
    workers. Layers in `restored` (name -> (weight, mask, record), from a checkpoint) are
    set to their saved result instead of being pruned again; `on_layer(name, weight, mask,
    record)` is called after each newly pruned layer (to checkpoint it). Paired statistics
    (`InputCovariance.cross`) make each layer's method prune toward `dense_target` instead
    of the layer's weights; its errors are measured from that target, and `error_dense`
    against the dense model's outputs. `masks` holds every layer's mask unless `keep_masks`
    is off (a run that checkpoints them and holds one block at a time). Setting
    `stop_requested` makes the next block (or layer) boundary raise `Interrupted`."""

    def __init__(self, settings: SequentialSettings, shapes: Sequence[tuple[int, int]],
                 restored: Mapping | None = None, on_layer: Callable | None = None,
                 executor=None, keep_masks: bool = True):
        self.settings = settings
        self.pattern = parse_pattern(settings.pattern)
        self.total_weights = sum(rows * cols for rows, cols in shapes)
        # place -> (start error, weights) of the layers pruned: in this block, the block before
        self.this_block: dict[str, tuple[float, int]] = {}
        self.block_before: dict[str, tuple[float, int]] = {}
        self.block_forecast: dict[str, tuple[float, int]] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.restored = restored or {}
        self.on_layer = on_layer
        self.executor = executor or LocalExecutor()
        self.keep_masks = keep_masks
        self.stop_requested = False

    def _budget(self, name: str, w0: torch.Tensor) -> tuple[float | None, int | None]:
        """(seconds, steps) of iCBS for the (rows, cols) weights `w0`, all or some rows of
        layer `name`: their share of the run's budget."""
        s = self.settings
        share = w0.numel() / self.total_weights
        place = _place(name)
        block = self.this_block if place in self.this_block else self.block_before
        if s.budget_share != "weights" and place in block:
            error, weights = (sum(x) for x in zip(*block.values(), strict=True))
            if error > 0:
                share *= block[place][0] / block[place][1] / (error / weights)
        if self.block_forecast:
            error, weights = next(v for k, v in self.block_forecast.items()
                                  if name.startswith(k))
            total = sum(e for e, _ in self.block_forecast.values())
            if total > 0:
                share *= error / total / (weights / self.total_weights)
        if s.steps is not None:
            return None, max(1, round(s.steps * share))
        return s.budget * share * self.executor.parallel, None

    def _remember(self, name: str, record: dict) -> None:
        """Keep a pruned layer's start error for the layer in its place in the next block."""
        place = _place(name)
        if place in self.this_block:  # a new block began
            self.block_before, self.this_block = self.this_block, {}
        self.this_block[place] = (record.get("error_before", 0.0),
                                  record["shape"][0] * record["shape"][1])

    def __call__(self, name: str, module: nn.Module,
                 cov: InputCovariance | list[InputCovariance] | None) -> dict:
        """Prune one layer given its input statistics (see `prune_weight`)."""
        return self.prune_block({name: module}, {name: cov} if cov is not None else {})[0]

    @torch.no_grad()
    def prune_block(self, layers: dict[str, nn.Module],
                    stats: dict[str, InputCovariance | list[InputCovariance]]) -> list[dict]:
        """Prune every module of `layers` (name -> module) given `stats` (name -> input
        statistics; absent for magnitude); one record per layer, in order. With one worker
        the layers go one by one (a stop is honoured after any of them); with more, the
        block's layers go out together (large ones in row parts, `_parts`)."""
        records = {}
        for name in layers:
            if name in self.restored:
                weight, mask, records[name] = self.restored[name]
                self._write(layers[name], name, weight, mask)
        fresh = [name for name in layers if name not in self.restored]
        one_by_one = self.executor.parallel == 1
        for chunk in [[name] for name in fresh] if one_by_one else [fresh] if fresh else []:
            if self.stop_requested:
                raise Interrupted(chunk[0])
            w0s, originals = {}, {}
            for name in chunk:
                weight = layers[name].weight
                check_layer(name, weight)
                w0s[name] = weight.detach().float().reshape(weight.shape[0], -1)
                cov = stats.get(name)
                if isinstance(cov, InputCovariance) and cov.paired:
                    originals[name] = w0s[name]
                    w0s[name] = dense_target(w0s[name], cov, self.settings.target_damp)
            results = self._run(w0s, stats)
            for name, (weight, mask, record) in results.items():
                record.update(shape=list(w0s[name].shape),
                              sparsity=1.0 - float(mask.float().mean()))
                if name in originals:
                    record["error_dense"] = dense_output_error(originals[name], weight,
                                                               stats[name])
                module = layers[name]
                self._write(module, name, weight, mask)
                record["zeros"] = float((module.weight == 0).float().mean())
                records[name] = record
                if self.on_layer is not None:
                    self.on_layer(name, module.weight, mask.cpu(), record)
        if self.stop_requested and not one_by_one:
            raise Interrupted(next(reversed(layers)))
        for name in layers:
            self._remember(name, records[name])
        return [records[name] for name in layers]

    def _parts(self, w0s: dict[str, torch.Tensor], stats: dict) -> dict[str, int]:
        """How many row parts each layer's block steps go out in: with more workers than a
        block's layers keep busy, a layer larger than the block's weights over the workers
        is split, where its rows are independent (iCBS, per_output or N:M)."""
        s = self.settings
        total = sum(w.numel() for w in w0s.values())
        share = -(-total // self.executor.parallel)
        splittable = s.method == "icbs" and self.pattern.kind != "unstructured"
        return {name: min(len(w), -(-w.numel() // share))
                if splittable and not isinstance(stats.get(name), list) else 1
                for name, w in w0s.items()}

    def _run(self, w0s: dict[str, torch.Tensor], stats: dict) -> dict[str, tuple]:
        """(weight, mask, record) of every layer of `w0s`, as executor jobs: a whole layer
        each (`prune_weight`) or, for a layer in row parts, its start first and then one
        `improve_weight` job per part, with the part's share of the budget."""
        parts = self._parts(w0s, stats)
        split = [n for n in w0s if parts[n] > 1]
        starts = dict(zip(split, self.executor.map(
            layer_job, [("start", self.settings, w0s[n], stats.get(n)) for n in split],
            sizes=[w0s[n].numel() for n in split]), strict=True))
        jobs, owners = [], []
        for name, w0 in w0s.items():
            if name not in starts:
                jobs.append(("prune", self.settings, w0, stats.get(name),
                             *self._budget(name, w0)))
                owners.append((name, None))
                continue
            weight, mask, _ = starts[name]
            for rows in torch.arange(len(w0)).tensor_split(parts[name]):
                jobs.append(("improve", self.settings, w0[rows], stats[name].hessian,
                             weight[rows], mask[rows], *self._budget(name, w0[rows])))
                owners.append((name, len(rows)))
        done = self.executor.map(layer_job, jobs, sizes=[job[2].numel() for job in jobs])
        results = {}
        for name in w0s:
            mine = [(rows, d) for (owner, rows), d in zip(owners, done, strict=True)
                    if owner == name]
            if name not in starts:
                results[name] = mine[0][1]
                continue
            weight = torch.cat([d[0] for _, d in mine])
            mask = torch.cat([d[1] for _, d in mine])
            record = {**starts[name][2], **_merge([d[2] for _, d in mine],
                                                  [rows for rows, _ in mine]),
                      "row_parts": parts[name]}
            results[name] = (weight, mask, record)
        return results

    def _write(self, module: nn.Module, name: str, weight: torch.Tensor, mask: torch.Tensor):
        module.weight.copy_(weight.reshape(module.weight.shape).to(module.weight.device,
                                                                    module.weight.dtype))
        if self.keep_masks:
            self.masks[name] = mask.cpu()
