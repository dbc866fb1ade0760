"""The knobs of a pruning run in frozen dataclasses, checked when they are made.

`PruneSettings` holds what every run has (what to prune, the block search, the seed) and
checks it once; `Settings` (an iCBS run on any model, `icbs.Pruner`),
`icbs.layer_pruning.SequentialSettings` (a model pruned layer by layer) and its extension
`icbs.llm.prune.LLMPruneSettings` (a causal LM pruned block by block) add their own. One name
per idea across all: a `*damp` is a ridge as a fraction of mean(diag H) (SparseGPT's
`percdamp` convention), `ridge` an absolute weight of |D|^2."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from icbs.checks import finite_at_least, integer_at_least, one_of, pattern_and_sparsity
from icbs.estimators import available_estimators
from icbs.scores import SCORES
from icbs.selection import LAYER_CHOICES, SELECTIONS

VERIFY = ("auto", "estimate", "loss")


@dataclass(frozen=True)
class PruneSettings:
    """What every pruning run is given.

    sparsity: fraction of each layer's weights pruned; None: 1 - N/M for an N:M pattern,
        else 0.5 (another sparsity with an N:M pattern is refused).
    pattern: "unstructured" (per layer), "per_output" (per row) or "N:M" such as "2:4";
        stored in its canonical spelling.
    solver: a solver name from `solvers.available()`; block_size: variables per block QUBO.
    include / exclude: shell-style patterns of layer names to prune / leave dense.
    """

    sparsity: float | None = None
    pattern: str = "unstructured"
    solver: str = "anneal"
    block_size: int = 256
    seed: int = 0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        pattern, sparsity = pattern_and_sparsity(self.pattern, self.sparsity)
        integer_at_least("block_size", self.block_size, 2)
        integer_at_least("seed", self.seed, 0)
        for name, value in (("pattern", str(pattern)), ("sparsity", sparsity),
                            ("include", tuple(self.include)), ("exclude", tuple(self.exclude))):
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Settings(PruneSettings):
    """Settings of an iCBS run (the fields of `PruneSettings`, and:)

    init: scores of the initial mask: magnitude, wanda, gradient or random.
    objective: estimator of the loss change: layerwise, fisher or exact.
    solver_params: keyword arguments of the solver.
    selection: "score" or "random" block candidates,
        ranked by `score` (default: the init scores; magnitude when init is random).
    layer_choice: "log_size" (layers drawn in proportion to log of their size, as in the
        paper) or "round_robin".
    gamma: gradient multiplier of the quadratic model; ridge: weight of |D|^2 added to it;
        qubo_eps: entries with |Q| <= qubo_eps * max|Q| are dropped before solving.
    tabu_steps, fix_frac_prune, fix_frac_keep: search controls (see `icbs.selection`).
    verify: "estimate" accepts a step when the model's dL < 0; "loss" also requires the
        calibration loss itself to go down (one forward pass per candidate step); "auto"
        is "loss" for the fisher and exact objectives and "estimate" for layerwise, whose
        model is exact.
    checkpoint_every: steps between checkpoints when a checkpoint path is given.
    """

    init: str = "magnitude"
    objective: str = "fisher"
    solver_params: dict = field(default_factory=dict)
    selection: str = "score"
    score: str | None = None
    layer_choice: str = "log_size"
    gamma: float = 1.0
    ridge: float = 0.0
    qubo_eps: float = 1e-12
    tabu_steps: int = 0
    fix_frac_prune: float = 0.0
    fix_frac_keep: float = 0.0
    verify: str = "auto"
    checkpoint_every: int = 100

    def __post_init__(self):
        super().__post_init__()
        one_of("init", self.init, SCORES)
        one_of("objective", self.objective, available_estimators())
        one_of("selection", self.selection, SELECTIONS)
        one_of("layer_choice", self.layer_choice, LAYER_CHOICES)
        one_of("verify", self.verify, VERIFY)
        if self.score is not None:
            one_of("score", self.score, SCORES)
        finite_at_least("gamma", self.gamma, None)
        finite_at_least("ridge", self.ridge)
        finite_at_least("qubo_eps", self.qubo_eps)
        for name in ("fix_frac_prune", "fix_frac_keep"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        integer_at_least("tabu_steps", self.tabu_steps, 0)
        integer_at_least("checkpoint_every", self.checkpoint_every, 1)

    @property
    def selection_score(self) -> str:
        if self.score is not None:
            return self.score
        return "magnitude" if self.init == "random" else self.init

    @property
    def verify_loss(self) -> bool:
        if self.verify == "auto":
            return self.objective != "layerwise"
        return self.verify == "loss"
