"""Which layer and which block of weights the next step works on.

A block takes, from randomly chosen constraint groups of one layer, candidates from the
pruned weights and from the kept weights, half and half where the group allows: uniformly at
random, or (`selection="score"`) favouring the pruned weights with the highest scores (the
likeliest to come back) and the kept weights with the lowest (the likeliest to go).
Optional controls, as in the paper: `fix_frac_prune` / `fix_frac_keep` take the lowest-scored
pruned / highest-scored kept fraction of each group out of play, and a tabu list keeps the
weights an accepted step changed out of the next `tabu_steps` blocks of that layer.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from icbs.layers import PrunableLayer
from icbs.masks import Pattern, group_ids

SELECTIONS = ("score", "random")
LAYER_CHOICES = ("log_size", "round_robin")


class BlockSelector:
    def __init__(
        self,
        layers: list[PrunableLayer],
        scores: dict[str, torch.Tensor],
        pattern: Pattern,
        block_size: int,
        *,
        selection: str = "score",
        layer_choice: str = "log_size",
        tabu_steps: int = 0,
        fix_frac_prune: float = 0.0,
        fix_frac_keep: float = 0.0,
    ):
        self.layers, self.block_size, self.selection = layers, block_size, selection
        self.layer_choice, self.tabu_steps = layer_choice, tabu_steps
        self.fix_frac_prune, self.fix_frac_keep = fix_frac_prune, fix_frac_keep
        sizes = np.array([math.log(layer.numel) for layer in layers])
        self.layer_probs = sizes / sizes.sum()
        self.group_orders = []  # per layer: (groups, group size) flat indices by ascending score
        for layer in layers:
            gid = group_ids(layer.shape, pattern).flatten().numpy()
            score = scores[layer.name].flatten().cpu().double().numpy()
            order = np.lexsort((score, gid))  # by group, then ascending score
            self.group_orders.append(order.reshape(gid.max() + 1, -1))
        self.tabu_until = [np.zeros(layer.numel, dtype=np.int64) for layer in layers]
        self.group_queue: list[np.ndarray | None] = [None] * len(layers)
        self.cursor = [0] * len(layers)
        self.step = 0

    def prioritize_rows(self, layer_index: int, row_priority: np.ndarray) -> None:
        """Visit this layer's groups by descending priority of their rows, cyclically,
        instead of at random (e.g. the rows with the largest error first)."""
        cols = self.layers[layer_index].shape[1]
        group_rows = self.group_orders[layer_index][:, 0] // cols
        self.group_queue[layer_index] = np.argsort(-row_priority[group_rows], kind="stable")
        self.cursor[layer_index] = 0

    def choose_layer(self, rng: np.random.Generator) -> int:
        if self.layer_choice == "round_robin":
            return self.step % len(self.layers)
        return int(rng.choice(len(self.layers), p=self.layer_probs))

    def choose_block(self, layer_index: int, rng: np.random.Generator) -> np.ndarray:
        """Flat indices of the next block of this layer (sorted); empty when none is free."""
        orders = self.group_orders[layer_index]
        pruned = ~self.layers[layer_index].mask.flatten().cpu().numpy()
        free = self.tabu_until[layer_index] <= self.step
        block: list[np.ndarray] = []
        room = self.block_size
        queue, start = self.group_queue[layer_index], self.cursor[layer_index]
        groups = rng.permutation(len(orders)) if queue is None else np.roll(queue, -start)
        visited = 0
        for g in groups:
            if room < 2:
                break
            visited += 1
            order = orders[g]
            p_side = order[pruned[order]]
            k_side = order[~pruned[order]]
            p_side = p_side[int(self.fix_frac_prune * len(p_side)):][::-1]  # highest first
            k_side = k_side[: len(k_side) - int(self.fix_frac_keep * len(k_side))]
            p_side, k_side = p_side[free[p_side]], k_side[free[k_side]]
            if len(p_side) == 0 or len(k_side) == 0:
                continue
            n_p = min(len(p_side), max(room // 2, room - len(k_side)))
            n_k = min(len(k_side), room - n_p)
            block += [self._pick(p_side, n_p, rng), self._pick(k_side, n_k, rng)]
            room -= n_p + n_k
        if queue is not None:
            self.cursor[layer_index] = (start + visited) % len(queue)
        self.step += 1
        return np.sort(np.concatenate(block)) if block else np.zeros(0, dtype=np.int64)

    def _pick(self, side: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
        """`count` of `side` (best candidates first) at random: uniformly for
        `selection="random"`, else with odds falling linearly with the rank."""
        if self.selection == "random" or count == len(side):
            return rng.choice(side, size=count, replace=False)
        odds = np.arange(len(side), 0, -1, dtype=np.float64)
        return rng.choice(side, size=count, replace=False, p=odds / odds.sum())

    def mark_changed(self, layer_index: int, changed: np.ndarray) -> None:
        self.tabu_until[layer_index][changed] = self.step + self.tabu_steps

    def state(self) -> dict:
        return {"step": self.step, "tabu_until": [t.copy() for t in self.tabu_until],
                "group_queue": list(self.group_queue), "cursor": list(self.cursor)}

    def load_state(self, state: dict) -> None:
        self.step = state["step"]
        self.tabu_until = [np.asarray(t) for t in state["tabu_until"]]
        self.group_queue, self.cursor = list(state["group_queue"]), list(state["cursor"])
