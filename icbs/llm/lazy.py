"""A causal LM held one decoder block at a time: weights read lazily from its safetensors
shards, the pruned model written shard by shard.

`LazyModel` builds the model's skeleton with its parameters on the meta device (buffers such
as rotary frequencies are real), then loads what is outside the decoder blocks (embeddings,
final norm, head) onto the device. A block's parameters are read (`safetensors.safe_open`,
each file closed after the read, so its mapped pages leave the process) when the block is
loaded, and written to their own output shard and dropped back to meta when it is done. So
host and device memory hold the parts outside the blocks, one block and the calibration
activations, whatever the depth of the model.
"""

from __future__ import annotations

import json
import resource
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from ..report import write_atomic
from .evaluate import next_token_nll
from .sequential import capture_block_inputs, decoder_blocks

INDEX = "model.safetensors.index.json"


class ShardedWeights:
    """Tensor name -> file of a model directory's safetensors weights (from the index, or
    the keys of the single file); reads a set of tensors, opening each file only for that."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            self.files = dict(json.loads(index.read_text())["weight_map"])
        else:
            self.files = {}
            for path in sorted(self.directory.glob("*.safetensors")):
                if path.name != "masks.safetensors":
                    with safe_open(path, "pt") as handle:
                        self.files.update(dict.fromkeys(handle.keys(), path.name))
        if not self.files:
            raise ValueError(f"{self.directory} holds no safetensors weights")

    def _each(self, names):
        """(name, tensor) for the tensors `names`, file by file, each file open only while
        its tensors are read."""
        from safetensors import safe_open

        by_file = defaultdict(list)
        for name in names:
            by_file[self.files[name]].append(name)
        for file, members in by_file.items():
            with safe_open(self.directory / file, "pt") as handle:
                for name in members:
                    yield name, handle.get_tensor(name)

    def read(self, names, device: torch.device, dtype: torch.dtype | None = None
             ) -> dict[str, torch.Tensor]:
        """The tensors `names` on `device` (floating ones cast to `dtype` when given)."""
        return {name: (tensor.to(dtype) if dtype is not None and tensor.is_floating_point()
                       else tensor).to(device) for name, tensor in self._each(names)}

    def check_finite(self, names) -> None:
        """Raise ValueError naming the first of the floating tensors `names` with a NaN or
        Inf entry; reads one tensor at a time."""
        for name, tensor in self._each(names):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{name.removesuffix('.weight')}: the weights have NaN or "
                                 f"Inf entries")

    def dtypes(self) -> dict[str, torch.dtype]:
        """The stored dtype of every tensor (read from the headers, not the data)."""
        from safetensors import safe_open

        found = {}
        for file in set(self.files.values()):
            with safe_open(self.directory / file, "pt") as handle:
                for name in handle.keys():
                    found[name] = handle.get_slice(name).get_dtype()
        return {name: _DTYPES[found[name]] for name in self.files}


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    path, _, leaf = name.rpartition(".")
    module = model.get_submodule(path)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


class LazyModel:
    """A causal LM from a Hugging Face directory (safetensors) with only the parts outside the
    decoder blocks resident: float32 on CPU, the stored dtype on a GPU (as `load_model`)."""

    def __init__(self, directory: str | Path, device: torch.device):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.directory = Path(directory)
        self.device = device
        self.dtype = torch.float32 if device.type == "cpu" else None
        self.weights = ShardedWeights(directory)
        self.stored_dtypes = self.weights.dtypes()
        config = AutoConfig.from_pretrained(directory)
        stored = getattr(config, "dtype", None) or torch.float32
        stored = getattr(torch, stored) if isinstance(stored, str) else stored
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(config, dtype=self.dtype or stored)
        self.model.eval()
        for module in self.model.modules():
            for key, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[key] = buffer.to(device)
        self.prefix, self.blocks = decoder_blocks(self.model)
        self.block_names = [[name for name in self.weights.files
                             if name.startswith(f"{self.prefix}.{index}.")]
                            for index in range(len(self.blocks))]
        in_blocks = {name for names in self.block_names for name in names}
        self.outer_names = [name for name in self.weights.files if name not in in_blocks]
        for name, tensor in self.weights.read(self.outer_names, device, self.dtype).items():
            _set_tensor(self.model, name, tensor)
        self.model.tie_weights()
        missing = [name for name, p in self.model.named_parameters()
                   if p.is_meta and not name.startswith(f"{self.prefix}.")]
        if missing:
            raise ValueError(f"{directory}: the weights hold no tensors for {missing}")

    def load_block(self, index: int) -> nn.Module:
        """Read block `index`'s weights onto the device; returns the block."""
        block = self.blocks[index]
        for name, tensor in self.weights.read(self.block_names[index], self.device,
                                              self.dtype).items():
            _set_tensor(self.model, name, tensor)
        missing = [name for name, p in block.named_parameters() if p.is_meta]
        if missing:
            raise ValueError(f"{self.directory}: block {index} has no weights for {missing}")
        return block

    def release_block(self, index: int) -> None:
        """Drop block `index`'s weights (back to meta tensors of the same shapes)."""
        for module in self.blocks[index].modules():
            for key, p in module._parameters.items():
                if p is not None:
                    module._parameters[key] = nn.Parameter(
                        torch.empty_like(p, device="meta"), requires_grad=False)

    def stored(self, names) -> dict[str, torch.Tensor]:
        """The model's current tensors `names` on the CPU, in the dtype they were stored in."""
        state = self.model.state_dict()
        return {name: state[name].detach().to("cpu", self.stored_dtypes[name]).contiguous()
                for name in names}

    @torch.no_grad()
    def window_nll(self, windows: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
        """The mean next-token NLL of each window (as `icbs.llm.evaluate.window_nll`),
        computed block by block: all windows through block 0, then block 1, ..., reading each
        block from the directory."""
        inputs = capture_block_inputs(self.model, self.blocks[0], windows, batch_size)
        tuple_output = False
        for index in range(len(self.blocks)):
            block = self.load_block(index)
            outputs = [block(hidden, *args, **kwargs) for hidden, args, kwargs in inputs.calls()]
            tuple_output = isinstance(outputs[0], (tuple, list))
            inputs.hidden = [out[0] if tuple_output else out for out in outputs]
            self.release_block(index)
        originals = list(self.blocks)
        parts = []
        try:
            for index in range(len(self.blocks)):
                self.blocks[index] = _Replay(tuple_output)
            for start, hidden in zip(range(0, len(windows), batch_size), inputs.hidden,
                                     strict=True):
                batch = windows[start:start + batch_size].to(self.device)
                self.blocks[-1].hidden = hidden
                parts.append(next_token_nll(self.model(input_ids=batch,
                                                       use_cache=False).logits, batch))
        finally:
            for index, block in enumerate(originals):
                self.blocks[index] = block
        return torch.cat(parts)


class _Replay(nn.Module):
    """Stands in for a decoder block: the last one returns the saved output hidden states of
    the batch, the others pass their input through, in the output format of the real block."""

    def __init__(self, tuple_output: bool):
        super().__init__()
        self.tuple_output = tuple_output
        self.hidden = None

    def forward(self, hidden_states, *args, **kwargs):
        out = hidden_states if self.hidden is None else self.hidden
        return (out,) if self.tuple_output else out


class ShardWriter:
    """Writes a model's tensors as numbered safetensors shards and, at the end, the index."""

    def __init__(self, directory: Path, shards: int):
        self.directory = Path(directory)
        self.shards = shards
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def write(self, number: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        name = f"model-{number + 1:05d}-of-{self.shards:05d}.safetensors"
        write_atomic(self.directory / name, save(tensors, metadata={"format": "pt"}))
        self.weight_map.update(dict.fromkeys(tensors, name))
        self.total_size += sum(t.numel() * t.element_size() for t in tensors.values())

    def finish(self) -> None:
        write_atomic(self.directory / INDEX, json.dumps(
            {"metadata": {"total_size": self.total_size},
             "weight_map": dict(sorted(self.weight_map.items()))}, indent=2).encode())


def bound_heap(threshold: int = 1 << 20) -> None:
    """Have glibc serve every allocation of `threshold` bytes or more by mmap, returned to
    the system when freed. Its default threshold rises to the size of the largest freed
    buffer, after which block-sized buffers come from the heap and fragment it: measured on
    a random 1024-wide LLaMA, RSS then grew by about one block (50 MB) per decoder block
    pruned, and stayed flat with this. No-op where the C library has no mallopt."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD; a set value also stops its growth
    except (OSError, AttributeError):
        pass


def peak_memory(device: torch.device) -> dict:
    """The process's peak resident set size and, on CUDA, peak allocated device memory."""
    peak = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        peak["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    return peak
