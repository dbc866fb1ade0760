"""The iCBS loop: an initial mask, then budgeted block coordinate descent.

Each step reads top to bottom: choose a layer and a block of its weights, estimate the
block's gradient and Hessian, build the block QUBO, solve it warm-started from the current
mask, and apply the answer when the QUBO's model of the change is negative; when the loss is
verified (`verify`, on by default for the Fisher and exact objectives) the change is also
undone unless the measured calibration loss went down. The layerwise objective's model is
exact, so its accepted steps lower the layer error. Masks keep their exact pruned count per
constraint group at every step.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from icbs.budget import Budget
from icbs.calibration import (
    LossFn,
    check_forward,
    load_batches,
    mean_loss,
    per_sample_signals,
)
from icbs.estimators import EstimatorContext, get_estimator
from icbs.layers import find_prunable
from icbs.masks import (
    group_ids,
    mask_from_scores,
    mask_matches_pattern,
    parse_pattern,
)
from icbs.report import Report, StepRecord, write_atomic
from icbs.scores import weight_scores
from icbs.selection import BlockSelector
from icbs.settings import Settings
from icbs.solver_choice import resolve_solver
from icbs.step import BlockAnswer, block_step, capped_block_size, set_block_mask

log = logging.getLogger(__name__)


class Pruner:
    """Prunes `model` in place to the settings' sparsity, then improves the masks step by step.

    Everything that can be wrong with the inputs is checked before any weight is touched.
    """

    def __init__(
        self,
        model: nn.Module,
        calibration: Iterable,
        settings: Settings,
        *,
        loss_fn: LossFn | None = None,
        solver=None,
    ):
        self.model, self.settings = model, settings
        self.loss_fn = loss_fn or F.cross_entropy
        self.pattern = parse_pattern(settings.pattern)
        self.solver = resolve_solver(settings.solver if solver is None else solver,
                                     settings.solver_params)
        self.block_size = capped_block_size(settings.block_size, self.solver)
        self.layers = find_prunable(model, settings.include, settings.exclude, self.pattern,
                                    settings.sparsity)
        device = self.layers[0].w0.device
        self.batches = load_batches(calibration, device)
        self.was_training = model.training
        model.eval()
        try:
            check_forward(model, self.layers, self.batches, self.loss_fn)
            self._start(model, settings)
        except BaseException:  # nothing half-applied: the model is handed back dense
            for layer in self.layers:
                layer.restore_dense()
            model.train(self.was_training)
            raise

    def _start(self, model: nn.Module, settings: Settings) -> None:
        """The initial masks, the block selector, the estimator and the solver's warm-up."""
        device = self.layers[0].w0.device

        start = time.perf_counter()
        kinds = {settings.init, settings.selection_score}
        context = EstimatorContext(model, self.layers, self.batches, self.loss_fn)
        # built on the dense model: statistics it gathers are those of the dense inputs
        self.estimator = get_estimator(settings.objective, context)
        stats = context.input_statistics() if "wanda" in kinds else None
        gradients = self._dense_gradients() if "gradient" in kinds else None
        generator = torch.Generator().manual_seed(settings.seed)
        scores = {kind: weight_scores(kind, self.layers, stats=stats, gradients=gradients,
                                      generator=generator) for kind in sorted(kinds)}
        masks = [mask_from_scores(scores[settings.init][layer.name], settings.sparsity,
                                  self.pattern) for layer in self.layers]
        for layer, mask in zip(self.layers, masks, strict=True):
            layer.mask = mask
            layer.apply()
        self.groups = [group_ids(layer.shape, self.pattern).flatten().to(device)
                       for layer in self.layers]
        self.selector = BlockSelector(
            self.layers, scores[settings.selection_score], self.pattern, self.block_size,
            selection=settings.selection, layer_choice=settings.layer_choice,
            tabu_steps=settings.tabu_steps, fix_frac_prune=settings.fix_frac_prune,
            fix_frac_keep=settings.fix_frac_keep)
        self.solver.warm_up()  # compilation is set-up, not budget
        self.rng = np.random.default_rng(settings.seed)
        self.trace: list[StepRecord] = []
        self.last_block: np.ndarray | None = None
        self.elapsed = 0.0
        self.init_seconds = time.perf_counter() - start
        self.objective_start = self.estimator.objective(self.layers)
        self.objective = self.objective_start
        self._stop = False
        self._loss: float | None = None  # calibration loss of the current masks, when known

    def _dense_gradients(self) -> dict[str, torch.Tensor]:
        signals, _ = per_sample_signals(self.model, self.layers, self.batches, self.loss_fn)
        return {name: torch.einsum("str,stc->rc", s.delta, s.x) / len(s.x)
                for name, s in signals.items()}

    @property
    def prunable_weights(self) -> int:
        return sum(layer.numel for layer in self.layers)

    def step(self) -> StepRecord:
        """One block step; the model changes only if the step is accepted."""
        settings = self.settings
        t0 = time.perf_counter()
        index = self.selector.choose_layer(self.rng)
        layer = self.layers[index]
        block, answer, accepted = block_step(
            layer, index, self.selector, self.groups[index], self.estimator, self.solver,
            self.rng, lambda answer: self._apply(index, answer), gamma=settings.gamma,
            ridge=settings.ridge, eps=settings.qubo_eps)
        self.last_block = block  # flat weight indices of this step's block (for exporters)
        delta, solver_time, estimate_time, solver_info = 0.0, 0.0, 0.0, {}
        if answer is not None:
            delta, solver_time = answer.delta, answer.solver_time
            estimate_time, solver_info = answer.estimate_time, _json_safe(answer.solver_info)
        if accepted:
            self.objective += delta
        self.elapsed += time.perf_counter() - t0
        record = StepRecord(
            step=len(self.trace), time=self.elapsed, layer=layer.name, block_size=len(block),
            delta=delta, accepted=bool(accepted), solver_time=solver_time,
            estimate_time=estimate_time, objective=self.objective, solver_info=solver_info)
        self.trace.append(record)
        return record

    def _apply(self, index: int, answer: BlockAnswer) -> bool:
        """Set the block's mask to the answer; when verifying the loss, undo it unless the
        calibration loss went down. Returns whether the change stayed."""
        layer = self.layers[index]
        old = layer.mask.clone()
        verify = self.settings.verify_loss
        if verify and self._loss is None:
            self._loss = mean_loss(self.model, self.batches, self.loss_fn)
        set_block_mask(layer, answer)
        assert mask_matches_pattern(layer.mask.cpu(), self.pattern, self.settings.sparsity)
        layer.apply()
        if verify:
            loss = mean_loss(self.model, self.batches, self.loss_fn)
            if loss >= self._loss:
                layer.mask = old
                layer.apply()
                return False
            self._loss = loss
        self.estimator.changed()
        return True

    def run(
        self,
        budget: Budget,
        *,
        checkpoint: str | Path | None = None,
        callback: Callable[[Pruner, StepRecord], None] | None = None,
        progress: bool = False,
    ) -> Report:
        """Take steps until the budget is spent (counted from the first step, across resumes)
        or Ctrl-C; a Ctrl-C stops after the current step and leaves a valid checkpoint."""
        check_checkpoint_path(checkpoint)
        max_steps = budget.max_steps(self.prunable_weights, self.block_size)
        bar = _progress_bar(max_steps, budget.seconds, progress)
        self._stop = False
        restore_sigint = self._catch_sigint()
        try:
            while not self._stop:
                if max_steps is not None and len(self.trace) >= max_steps:
                    break
                if budget.seconds is not None and self.elapsed >= budget.seconds:
                    break
                record = self.step()
                if callback is not None:
                    callback(self, record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(objective=f"{self.objective:.4g}",
                                    accepted=sum(r.accepted for r in self.trace))
                if checkpoint is not None and len(self.trace) % \
                        self.settings.checkpoint_every == 0:
                    self.save_checkpoint(checkpoint)
        finally:
            restore_sigint()
            if bar is not None:
                bar.close()
        if checkpoint is not None:
            self.save_checkpoint(checkpoint)
        if self._stop:
            log.info("stopped on request after step %d%s", len(self.trace),
                     "" if checkpoint is None else f"; checkpoint {checkpoint} is consistent")
        return self.report()

    def stop(self) -> None:
        """Ask `run` to stop after the current step (what Ctrl-C does)."""
        self._stop = True

    def _catch_sigint(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum, frame):
            self.stop()

        previous = signal.signal(signal.SIGINT, handler)
        return lambda: signal.signal(signal.SIGINT, previous)

    def finish(self) -> None:
        """Leave the model in the mode it was handed over in."""
        self.model.train(self.was_training)

    def report(self) -> Report:
        return Report(
            settings=self.settings.to_dict() | {"solver": self.solver.name,
                                                "block_size": self.block_size},
            layers=[{"name": layer.name, "shape": list(layer.shape),
                     "sparsity": float(1 - layer.mask.float().mean())} for layer in self.layers],
            trace=list(self.trace),
            timings={"init_seconds": self.init_seconds, "run_seconds": self.elapsed},
            objective={"start": self.objective_start, "estimated_end": self.objective},
        )

    # Checkpoints: one safetensors file, the masks (and the selector's arrays) as tensors,
    # everything else as JSON in its metadata; written atomically, read without pickle.

    def save_checkpoint(self, path: str | Path) -> None:
        from safetensors.torch import save

        selector = self.selector.state()
        tensors = {f"mask/{layer.name}": layer.mask.cpu().contiguous() for layer in self.layers}
        for i, (tabu, queue) in enumerate(zip(selector["tabu_until"], selector["group_queue"],
                                              strict=True)):
            tensors[f"tabu/{i}"] = torch.from_numpy(np.ascontiguousarray(tabu))
            if queue is not None:
                tensors[f"queue/{i}"] = torch.from_numpy(np.ascontiguousarray(queue))
        state = {
            "format": CHECKPOINT_FORMAT,
            "settings": self.settings.to_dict(),
            "layers": [layer.name for layer in self.layers],
            "rng": self.rng.bit_generator.state,
            "selector": {"step": selector["step"], "cursor": selector["cursor"]},
            "trace": [vars(r) for r in self.trace],
            "elapsed": self.elapsed,
            "objective": self.objective,
        }
        write_atomic(Path(path), save(tensors, metadata={"icbs": json.dumps(state)}))

    def load_checkpoint(self, path: str | Path) -> None:
        """Continue from a checkpoint of a run with the same settings on the same model."""
        tensors, state = read_checkpoint(path)
        if state["settings"] != json.loads(json.dumps(self.settings.to_dict())):
            raise ValueError(f"checkpoint {path} was written with other settings: "
                             f"{state['settings']}")
        names = [layer.name for layer in self.layers]
        if state["layers"] != names:
            raise ValueError(f"checkpoint {path} has layers {state['layers']}, the model "
                             f"has {names}")
        masks = {}
        for layer in self.layers:
            mask = tensors.get(f"mask/{layer.name}")
            if mask is None or mask.dtype != torch.bool or mask.shape != layer.mask.shape or \
                    not mask_matches_pattern(mask, self.pattern, self.settings.sparsity):
                raise ValueError(f"checkpoint {path}: mask of {layer.name} does not fit")
            masks[layer.name] = mask
        selector = {"step": state["selector"]["step"], "cursor": state["selector"]["cursor"],
                    "tabu_until": [tensors[f"tabu/{i}"].numpy() for i in range(len(names))],
                    "group_queue": [tensors[f"queue/{i}"].numpy() if f"queue/{i}" in tensors
                                    else None for i in range(len(names))]}
        for layer in self.layers:
            layer.mask = masks[layer.name].to(layer.w0.device)
            layer.apply()
        self.rng.bit_generator.state = state["rng"]
        self.selector.load_state(selector)
        self.trace = [StepRecord(**r) for r in state["trace"]]
        self.elapsed = state["elapsed"]
        self.objective = state["objective"]
        self._loss = None
        self.estimator.changed()


CHECKPOINT_FORMAT = "icbs-checkpoint-1"


def check_checkpoint_path(path: str | Path | None) -> None:
    """Raise unless `path` (when given) can be written as a checkpoint file."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a directory; give a file path")
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"checkpoint {path}: {path.parent} is not a directory")


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of a checkpoint written by `Pruner.save_checkpoint`; anything else
    (a pickle, a foreign or corrupt file) is refused with a ValueError naming the file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} is not a file")
    try:
        with safe_open(path, "pt") as handle:
            state = json.loads((handle.metadata() or {})["icbs"])
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        if state.get("format") != CHECKPOINT_FORMAT:
            raise KeyError("format")
        missing = [key for key in ("settings", "layers", "rng", "selector", "trace", "elapsed",
                                   "objective") if key not in state]
        if missing:
            raise KeyError(missing)
        needed = {f"tabu/{i}" for i in range(len(state["layers"]))}
        if not needed <= tensors.keys():
            raise KeyError("tabu")
    except (SafetensorError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"checkpoint {path} is not an icbs checkpoint (a safetensors file "
                         f"written by Pruner.save_checkpoint): {exc!r}") from None
    return tensors, state


def _json_safe(info: dict) -> dict:
    """The solver's scalar info (penalty, repairs, sweeps, ...) for the step record."""
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in info.items()
            if isinstance(v, (int, float, str, bool, np.generic))}


def _progress_bar(max_steps: int | None, seconds: float | None, show: bool):
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=max_steps, desc="iCBS steps", unit="step",
                postfix=None if seconds is None else {"budget_s": seconds})
