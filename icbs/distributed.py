"""Where the independent work of a decoder block runs: in this process, or on Ray workers.

Given its input statistics, each linear layer of a block is an independent problem, so a
block's layers are handed to an executor as one batch of jobs. `LocalExecutor` runs them
one after another here; `RayExecutor` sends them to Ray tasks (an embedded local instance
with `workers` CPUs, or an existing cluster at `address`), putting each distinct tensor
argument (a layer's input statistics, shared by q/k/v or gate/up) in the object store once.
A task whose worker dies is retried by Ray; jobs are pure functions of their arguments, so
a retry gives the same result. Ray is imported only by `RayExecutor`.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Sequence

RETRIES = 3  # attempts Ray makes after a worker dies mid-task


class LocalExecutor:
    """Runs the jobs in this process, in order."""

    parallel = 1

    def map(self, fn: Callable, jobs: Sequence[tuple], sizes: Sequence[int] | None = None
            ) -> list:
        return [fn(*job) for job in jobs]

    def close(self) -> None:
        pass


class RayExecutor:
    """Runs the jobs as Ray tasks of one CPU each; `parallel` is the CPUs Ray has."""

    def __init__(self, workers: int | None = None, address: str | None = None):
        if address is None and not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & set(os.environ):
            # An embedded instance: token authentication with a token that lives only in
            # this process's environment (Ray would otherwise write one to ~/.ray). Ray reads
            # its configuration when imported, so this comes first.
            os.environ["RAY_AUTH_MODE"] = "token"
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        if address is None:
            # Ray starts its workers at nice 15, and beside busy processes they all but stop
            # (a tiny model's run: over 250 s against 36 s at nice 0, three busy processes
            # on 2 cores). The layer jobs are this run's main work: the driver's priority.
            os.environ.setdefault("RAY_worker_niceness", "0")
        try:
            import ray
        except ImportError:
            raise ImportError("--workers / --ray-address need Ray: pip install "
                              "'icbs[distributed]'") from None
        self._ray = ray
        self._remote: dict[Callable, object] = {}
        if address is None:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        self.parallel = max(1, int(ray.cluster_resources().get("CPU", 1)))

    def map(self, fn: Callable, jobs: Sequence[tuple], sizes: Sequence[int] | None = None
            ) -> list:
        """fn(*job) for every job, in the jobs' order; the largest `sizes` are sent first,
        so that the small ones fill in behind them."""
        ray = self._ray
        if fn not in self._remote:
            self._remote[fn] = ray.remote(num_cpus=1, max_retries=RETRIES)(fn)
        remote = self._remote[fn]
        stored: dict[int, object] = {}

        def put(value):
            if isinstance(value, (int, float, str, bool, type(None))):
                return value
            if id(value) not in stored:
                stored[id(value)] = ray.put(value)
            return stored[id(value)]

        order = sorted(range(len(jobs)), key=lambda i: -(sizes[i] if sizes else 0))
        refs = {i: remote.remote(*[put(arg) for arg in jobs[i]]) for i in order}
        return ray.get([refs[i] for i in range(len(jobs))])

    def close(self) -> None:
        self._ray.shutdown()


def make_executor(workers: int | None = None, address: str | None = None):
    """A `RayExecutor` when workers or an address is given, else a `LocalExecutor`."""
    if workers is None and address is None:
        return LocalExecutor()
    return RayExecutor(workers, address)
