"""Benchmark the solvers on pruning-like cardinality QUBOs; writes CSV, PNG and a markdown table.

Instances: w0 ~ N(0, 1), G ~ N(0, 1) of m rows, H = G^T G / m, Q = 1/2 (w0 w0^T) * H,
k = n/2, either one group ("one") or 8 equal groups ("rows", as if the block held 8 output
rows with per-row sparsity). Every solver runs on the same instances, one after the other,
on one core (NUMBA/OpenBLAS/OMP threads = 1), after a warm-up call so that numba
compilation is not timed. gap = (E - E_best) / (E_start - E_best), with E_start the
magnitude start (smallest Q_ii per group) and E_best the lowest energy any run found.

    python experiments/bench_solvers.py               # default, about 10 minutes
    python experiments/bench_solvers.py --quick       # n = 64, 256 only (a minute)
    python experiments/bench_solvers.py --sizes 256 --seeds 0 1 2 3 4 --seed-sizes 256

`--seeds` (default 0-4) repeats anneal default, greedy and every neal setting on the
instances of those seeds at the sizes `--seed-sizes` (default 256) and adds a per-seed table
with the median (the instance of seed s at size n is built from seed s + n, the solvers get
seed s, as in the main run).

Outputs in experiments/results/: bench_solvers.csv, bench_solvers.png, bench_solvers.md,
bench_solvers_memory.csv (anneal at n = 8192 and 16384).
"""

from __future__ import annotations

import os

for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from solvers import CardinalityQUBO, get_solver  # noqa: E402

log = logging.getLogger("bench_solvers")
RESULTS = Path(__file__).resolve().parent / "results"


def pruning_instance(n: int, m: int, seed: int, pattern: str) -> CardinalityQUBO:
    """Q = 1/2 (w0 w0^T) * (G^T G / m), built in place (one n x n array)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(n)
    G = rng.standard_normal((m, n))
    Q = G.T @ G  # symmetric (BLAS syrk)
    for r0 in range(0, n, 512):  # Q_ij *= (w_i w_j) / (2m), exactly symmetric, no temporaries
        Q[r0 : r0 + 512] *= np.outer(w[r0 : r0 + 512], w) * (0.5 / m)
    if pattern == "one":
        groups, k = None, n // 2
    else:
        groups = np.repeat(np.arange(8), n // 8)
        k = n // 16
    return CardinalityQUBO(Q, k, groups, copy=False)


def runs_for(n: int) -> list[tuple[str, dict]]:
    """(solver, params) pairs run on an instance of size n."""
    runs: list[tuple[str, dict]] = [
        ("greedy", {}),
        ("anneal", {}),
        ("anneal", {"restarts": 3}),
        ("anneal", {"restarts": 10}),
        ("anneal", {"num_betas": 1000}),
    ]
    neal_penalties = [1.0, 0.1, 0.01, 0.001] if n <= 1024 else [1.0, 0.01]
    for scale in neal_penalties:
        runs.append(("neal", {"num_reads": 1, "num_sweeps": 1000, "penalty_scale": scale}))
    if n <= 1024:
        runs.append(("neal", {"num_reads": 10, "num_sweeps": 1000, "penalty_scale": 0.01}))
        runs.append(("neal", {"num_reads": 1, "num_sweeps": 100, "penalty_scale": 0.01}))
    # long runs that define the best known energy
    if n <= 1024:
        runs.append(("anneal", {"num_betas": 1000, "sweeps_per_beta": 10, "restarts": 4}))
    else:
        runs.append(("anneal", {"num_betas": 1000, "sweeps_per_beta": 4, "restarts": 2}))
    return runs


def run_one(problem: CardinalityQUBO, name: str, params: dict, seed: int) -> dict:
    params = dict(params)
    if "penalty_scale" in params:
        params["penalty"] = params.pop("penalty_scale") * problem.default_penalty()
    cpu = time.process_time()
    res = get_solver(name, **params).solve(problem, seed=seed)
    cpu = time.process_time() - cpu
    return {
        "energy": res.energy,
        "wall_time": res.info["wall_time"],
        "cpu_time": cpu,
        "infeasible": res.info.get("num_infeasible", ""),
        "repair_flips": res.info.get("repair_flips", ""),
        "penalty": res.info.get("penalty", ""),
    }


def warm_up() -> None:
    """Compile / load every numba kernel once, on a small instance (not timed)."""
    p = pruning_instance(64, 16, 0, "rows")
    for name in ("greedy", "anneal"):
        get_solver(name).solve(p, seed=0)
    get_solver("neal", num_reads=1, num_sweeps=10, polish=True).solve(p, seed=0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024, 4096])
    ap.add_argument("--patterns", nargs="+", default=["one", "rows"])
    ap.add_argument("--m", type=int, default=64,
                    help="rows of G (calibration samples); 0 means m = n (full-rank H)")
    ap.add_argument("--memory-sizes", type=int, nargs="*", default=[8192, 16384])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4],
                    help="seeds of the per-seed table (anneal default vs neal)")
    ap.add_argument("--seed-sizes", type=int, nargs="*", default=[256],
                    help="sizes of the per-seed table")
    ap.add_argument("--quick", action="store_true", help="n = 64, 256; no memory runs")
    ap.add_argument("--solvers", nargs="+", default=["greedy", "anneal", "neal"])
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    ap.add_argument("--replot", action="store_true", help="redraw the PNG from the CSV only")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.memory_sizes, args.seeds = [64, 256], [], []
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bench_solvers{args.tag}"
    if args.replot:
        with open(f"{stem}.csv") as fh:
            rows = [{**r, "n": int(r["n"]), "energy": float(r["energy"]), "gap": float(r["gap"]),
                     "wall_time": float(r["wall_time"]), "e_best": float(r["e_best"])}
                    for r in csv.DictReader(fh)]
        plot(rows, stem.with_suffix(".png"))
        return

    t0 = time.perf_counter()
    warm_up()
    log.info("warm-up (numba load/compile) %.2f s", time.perf_counter() - t0)

    rows: list[dict] = []
    for n in args.sizes:
        for pattern in args.patterns:
            problem = pruning_instance(n, args.m or n, args.seed + n, pattern)
            e_start = problem.energy(problem.magnitude_start())
            t = time.perf_counter()
            problem.to_bqm()
            bqm_time = time.perf_counter() - t
            inst_rows = []
            for name, params in runs_for(n):
                if name not in args.solvers:
                    continue
                r = run_one(problem, name, params, args.seed)
                row = {"n": n, "pattern": pattern, "solver": name,
                       "params": json.dumps(params, sort_keys=True), "e_start": e_start, **r}
                inst_rows.append(row)
                log.info("n=%d %s %s %s E=%.6g t=%.3fs", n, pattern, name, row["params"],
                         r["energy"], r["wall_time"])
            e_best = min(r["energy"] for r in inst_rows)
            for r in inst_rows:
                r["e_best"] = e_best
                r["gap"] = (r["energy"] - e_best) / (e_start - e_best)
                r["bqm_build_time"] = bqm_time
            rows.extend(inst_rows)
            del problem

    fields = ["n", "pattern", "solver", "params", "energy", "gap", "wall_time", "cpu_time",
              "e_start",
              "e_best", "penalty", "infeasible", "repair_flips", "bqm_build_time"]
    with open(f"{stem}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in fields})

    mem_rows = []
    for n in args.memory_sizes:
        problem = pruning_instance(n, args.m or n, args.seed + n, "one")
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        e_start = problem.energy(problem.magnitude_start())
        res = get_solver("anneal").solve(problem, seed=args.seed)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        mem_rows.append({"n": n, "q_gib": problem.Q.nbytes / 2**30, "energy": res.energy,
                         "e_start": e_start, "wall_time": res.info["wall_time"],
                         "peak_rss_gib_before": rss_before, "peak_rss_gib": rss})
        log.info("memory n=%d: E %.4g from %.4g in %.2f s, Q %.2f GiB, peak RSS %.2f GiB",
                 n, res.energy, e_start, res.info["wall_time"], mem_rows[-1]["q_gib"], rss)
        del problem, res
    if mem_rows:
        with open(f"{stem}_memory.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(mem_rows[0]))
            w.writeheader()
            w.writerows(mem_rows)

    seed_rows = seed_runs(args)
    if seed_rows:
        with open(f"{stem}_seeds.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(seed_rows[0]))
            w.writeheader()
            w.writerows(seed_rows)

    plot(rows, stem.with_suffix(".png"))
    stem.with_suffix(".md").write_text(summary(rows, mem_rows, args) + seed_summary(seed_rows))
    log.info("total %.1f s; wrote %s", time.perf_counter() - t0, args.out)


def seed_runs(args: argparse.Namespace) -> list[dict]:
    """anneal default, greedy and every neal setting on the instances of each of args.seeds
    (nothing unless both anneal and neal are among args.solvers)."""
    out: list[dict] = []
    if not {"anneal", "neal"} <= set(args.solvers):
        return out
    for n in args.seed_sizes:
        for pattern in args.patterns:
            for seed in args.seeds:
                problem = pruning_instance(n, args.m or n, seed + n, pattern)
                for name, params in runs_for(n):
                    if name not in args.solvers or (name == "anneal" and params):
                        continue
                    r = run_one(problem, name, params, seed)
                    out.append({"n": n, "pattern": pattern, "seed": seed, "solver": name,
                                "params": json.dumps(params, sort_keys=True),
                                "energy": r["energy"], "wall_time": r["wall_time"],
                                "cpu_time": r["cpu_time"]})
                log.info("seed %d n=%d %s done", seed, n, pattern)
    return out


def seed_summary(seed_rows: list[dict]) -> str:
    """Per seed: anneal default against the best neal setting of that instance."""
    if not seed_rows or not any(r["solver"] == "neal" for r in seed_rows):
        return ""
    out = ["", "anneal default against the best neal setting, per seed (instance seed s + n, "
           "solver seed s):", "",
           "| n | groups | seed | E anneal | wall / CPU [ms] | best E neal (setting) "
           "| wall / CPU [ms] | E neal/anneal | speed-up wall / CPU |",
           "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["n"], r["pattern"]) for r in seed_rows})
    for n, pattern in keys:
        stats = []
        for seed in sorted({r["seed"] for r in seed_rows}):
            inst = [r for r in seed_rows if (r["n"], r["pattern"], r["seed"]) == (n, pattern, seed)]
            if not inst:
                continue
            a = next(r for r in inst if r["solver"] == "anneal")
            bn = min((r for r in inst if r["solver"] == "neal"), key=lambda r: r["energy"])
            st = (a["energy"], a["wall_time"], a["cpu_time"], bn["energy"], bn["wall_time"],
                  bn["cpu_time"], bn["energy"] / a["energy"], bn["wall_time"] / a["wall_time"],
                  bn["cpu_time"] / max(a["cpu_time"], 1e-9))
            stats.append(st)
            out.append(f"| {n} | {pattern} | {seed} | {st[0]:.4g} | {st[1] * 1e3:.1f} / "
                       f"{st[2] * 1e3:.1f} | {st[3]:.4g} ({label(bn)}) | {st[4] * 1e3:.0f} / "
                       f"{st[5] * 1e3:.0f} | {st[6]:.2f} | {st[7]:.0f}x / {st[8]:.0f}x |")
        med = np.median(np.array(stats), axis=0)
        wins = sum(st[0] < st[3] for st in stats)
        out.append(f"| {n} | {pattern} | **median** ({wins}/{len(stats)} lower) | "
                   f"{med[0]:.4g} | {med[1] * 1e3:.1f} / {med[2] * 1e3:.1f} | {med[3]:.4g} | "
                   f"{med[4] * 1e3:.0f} / {med[5] * 1e3:.0f} | {med[6]:.2f} | "
                   f"{med[7]:.0f}x / {med[8]:.0f}x |")
    return "\n".join(out) + "\n"


def label(r: dict) -> str:
    p = json.loads(r["params"])
    if r["solver"] == "neal":
        return (f"neal P*{p['penalty_scale']:g} {p['num_reads']}x{p['num_sweeps']}")
    if r["solver"] == "anneal":
        if not p:
            return "anneal default"
        return "anneal " + " ".join(f"{k}={v}" for k, v in p.items())
    return r["solver"]


def plot(rows: list[dict], path: Path) -> None:
    """Top: gap to the best energy relative to the start; bottom: E / E_best - 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patterns = sorted({r["pattern"] for r in rows})
    sizes = sorted({r["n"] for r in rows})
    fig, axes = plt.subplots(2, len(patterns), figsize=(6.5 * len(patterns), 9), squeeze=False)
    colors = dict(zip(sizes, plt.cm.viridis(np.linspace(0, 0.9, len(sizes))), strict=True))
    markers = {"greedy": "s", "anneal": "o", "neal": "^"}
    floor = 1e-6
    measures = [("gap", "gap (E - E_best) / (E_start - E_best)"),
                ("excess", "excess E / E_best - 1")]
    for col, pattern in enumerate(patterns):
        for row, (key, name) in enumerate(measures):
            ax = axes[row][col]
            for r in rows:
                if r["pattern"] != pattern:
                    continue
                value = r["gap"] if key == "gap" else r["energy"] / r["e_best"] - 1
                ax.scatter(max(r["wall_time"], 1e-4), max(value, floor), s=36,
                           marker=markers[r["solver"]], color=colors[r["n"]],
                           facecolors="none" if r["solver"] == "neal" else colors[r["n"]])
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("wall time per call [s], one core")
            ax.set_ylabel(f"{name}\n(0 drawn at {floor:g})")
            ax.set_title(f"k = n/2, groups: {pattern}")
            ax.grid(True, which="major", alpha=0.3)
    handles = [plt.Line2D([], [], ls="", marker=m, color="k", mfc="none" if s == "neal" else "k",
                          label=s) for s, m in markers.items()]
    handles += [plt.Line2D([], [], ls="", marker="o", color=c, label=f"n = {n}")
                for n, c in colors.items()]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=9,
               bbox_to_anchor=(0.5, 0.955))
    fig.suptitle("Solvers on pruning-like QUBOs (Q = 1/2 w w^T * H): energy vs wall time")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(rows: list[dict], mem_rows: list[dict], args: argparse.Namespace) -> str:
    cmd = "python " + " ".join(["experiments/bench_solvers.py", *sys.argv[1:]])
    m = args.m if args.m else "n"
    out = [f"Command: `{cmd}` (m = {m}, seed {args.seed}, one core, compile excluded)", ""]
    out.append("| n | groups | solver | energy | gap | wall time [s] | CPU time [s] |")
    out.append("|---|---|---|---|---|---|---|")
    for r in rows:
        out.append(f"| {r['n']} | {r['pattern']} | {label(r)} | {r['energy']:.5g} | "
                   f"{r['gap']:.2e} | {r['wall_time']:.3f} | {r['cpu_time']:.3f} |")
    if not any(r["solver"] == "neal" for r in rows):
        return "\n".join(out) + "\n"
    out += ["", "anneal (default, one restart) against the best neal run of each instance:", "",
            "| n | groups | E anneal | t anneal | best E neal | its t | E ratio neal/anneal "
            "| fastest anneal run with E <= best neal: t, speed-up |",
            "|---|---|---|---|---|---|---|---|"]
    for n in sorted({r["n"] for r in rows}):
        for pattern in sorted({r["pattern"] for r in rows}):
            inst = [r for r in rows if r["n"] == n and r["pattern"] == pattern]
            if not inst:
                continue
            a = next(r for r in inst if r["solver"] == "anneal" and r["params"] == "{}")
            neal = [r for r in inst if r["solver"] == "neal"]
            if not neal:
                continue
            bn = min(neal, key=lambda r: r["energy"])
            ok = [r for r in inst if r["solver"] == "anneal" and r["energy"] <= bn["energy"]]
            fast = min(ok, key=lambda r: r["wall_time"]) if ok else None
            speed = (f"{fast['wall_time']:.3f} s, {bn['wall_time'] / fast['wall_time']:.0f}x "
                     f"(CPU {bn['cpu_time'] / max(fast['cpu_time'], 1e-9):.0f}x)"
                     if fast else "none")
            out.append(f"| {n} | {pattern} | {a['energy']:.4g} | {a['wall_time']:.3f} | "
                       f"{bn['energy']:.4g} ({label(bn)}) | {bn['wall_time']:.2f} | "
                       f"{bn['energy'] / a['energy']:.3g} | {speed} |")
    if mem_rows:
        out += ["", "Memory (anneal default, one group):", "",
                "| n | Q [GiB] | E start | E | time [s] | peak RSS [GiB] |",
                "|---|---|---|---|---|---|"]
        for m in mem_rows:
            out.append(f"| {m['n']} | {m['q_gib']:.2f} | {m['e_start']:.4g} | {m['energy']:.4g} "
                       f"| {m['wall_time']:.2f} | {m['peak_rss_gib']:.2f} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
