"""Where a model's pruning error will be, known before any layer is pruned: the dense
model's per-layer Wanda error estimate, summed per decoder block. `LayerPruner` shares the
iCBS budget over the blocks by it (`budget_share="error+blocks"`): the error of a pruned
LLM grows steeply with depth (SmolLM2-135M at 50%: 0.4% of the start error in block 0,
19% in block 29 of 30), and so does what a second of refit steps removes there."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..baselines import wanda_mask
from .sequential import capture_block_inputs, decoder_blocks, dense_pass, select_linears

FORECAST_WINDOWS = 8  # calibration windows the forecast runs the dense model on


@torch.no_grad()
def forecast_block_errors(model: torch.nn.Module, windows: torch.Tensor, sparsity: float,
                          pattern: str, *, include: Sequence[str] = ("*",),
                          exclude: Sequence[str] = (), batch_size: int = 8,
                          load_block: Callable[[int], None] | None = None,
                          release_block: Callable[[int], None] | None = None
                          ) -> dict[str, tuple[float, int]]:
    """Decoder block prefix (e.g. "model.layers.3.") -> (forecast error, prunable weights).

    A layer's forecast is the output error of Wanda's mask without a refit under the
    diagonal of its input statistics: the sum of w_rc^2 mean(x_c^2) over the weights that
    the mask (the smallest |w_rc| ||x_c|| of each group of `pattern`) prunes, its inputs
    those of the dense model on `windows`. `load_block(index)` is called before block
    `index` is used and `release_block(index)` after (a model held one block at a time,
    `icbs.llm.lazy.LazyModel`: each block is read once more for the forecast)."""
    prefix, blocks = decoder_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], windows, batch_size)
    forecast = {}
    for index, block in enumerate(blocks):
        if load_block is not None:
            load_block(index)
        name = f"{prefix}.{index}"
        layers = select_linears(block, name, include, exclude)
        outputs, captured = dense_pass(block, layers, inputs.hidden, inputs)
        error = 0.0
        for layer_name, layer in layers.items():
            xs = [batch[layer_name].reshape(-1, batch[layer_name].shape[-1]).float()
                  for batch in captured]
            mean_square = sum((x * x).sum(0) for x in xs) / sum(len(x) for x in xs)
            weight = layer.weight.detach().float().reshape(layer.weight.shape[0], -1)
            pruned = ~wanda_mask(weight, mean_square.sqrt(), sparsity, pattern)
            error += float((weight.square() * mean_square)[pruned].sum())
        forecast[name + "."] = (error, sum(layer.weight.numel() for layer in layers.values()))
        inputs.hidden = outputs
        if release_block is not None:
            release_block(index)
    return forecast
