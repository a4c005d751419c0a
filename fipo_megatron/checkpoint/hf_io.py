"""Hugging Face safetensors I/O, one tensor at a time.

Reading: :class:`HFCheckpointReader` opens a directory with ``model.safetensors.index.json`` (sharded)
or without (one or more ``*.safetensors`` files) and hands out single tensors through ``safe_open``
(memory-mapped), so a 32B checkpoint never sits in memory as a whole.

Writing: :func:`write_safetensors_shards` streams tensors into sharded safetensors files. The shard
plan (names, shapes, dtypes, offsets) is fixed up front, so each file's header is written first and
each tensor's bytes go straight to disk: peak memory is one tensor, not one shard. The files are
standard safetensors (``__metadata__ = {"format": "pt"}``) plus the usual index json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Iterable, Iterator

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files copied from a reference HF directory next to converted weights (config, generation and tokenizer).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")

_DTYPE_TO_ST = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _st in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _DTYPE_TO_ST[getattr(torch, _name)] = _st


class HFCheckpointReader:
    """Lazy, tensor-by-tensor access to the safetensors of one HF model directory."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.hf_dir = Path(hf_dir)
        if not self.hf_dir.is_dir():
            raise FileNotFoundError(f"HF checkpoint directory not found: {self.hf_dir}")
        index = self.hf_dir / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {name: self.hf_dir / fname for name, fname in weight_map.items()}
            for path in sorted(set(self._file_of.values())):
                if not path.is_file():
                    raise FileNotFoundError(f"shard {path} listed in {index} does not exist")
        else:
            files = sorted(self.hf_dir.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no {INDEX_NAME} and no *.safetensors files in {self.hf_dir}")
            self._file_of = {}
            for path in files:
                with self._open(path) as handle:
                    for name in handle.keys():
                        self._file_of[name] = path

    def _open(self, path: Path):
        from safetensors import safe_open

        return safe_open(str(path), framework="pt", device="cpu")

    def _path(self, name: str) -> Path:
        if name not in self._file_of:
            raise KeyError(f"tensor {name!r} not found in HF checkpoint {self.hf_dir}")
        return self._file_of[name]

    def names(self) -> list[str]:
        """All tensor names in the checkpoint."""
        return sorted(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a fresh CPU tensor backed by its own memory)."""
        # Open and close the file per tensor: a memory map held open keeps every page read so far in
        # this process's RSS, which for a whole checkpoint is one more copy of the model.
        with self._open(self._path(name)) as handle:
            return handle.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of ``name`` without reading its data."""
        with self._open(self._path(name)) as handle:
            return tuple(handle.get_slice(name).get_shape())

    def dtype(self) -> torch.dtype:
        """The dtype of the first floating-point tensor (the checkpoint's parameter dtype)."""
        by_st = {v: k for k, v in _DTYPE_TO_ST.items()}
        for name in self.names():
            with self._open(self._path(name)) as handle:
                dtype = by_st.get(handle.get_slice(name).get_dtype())
            if dtype is not None and dtype.is_floating_point:
                return dtype
        raise ValueError(f"no floating-point tensor in {self.hf_dir}")

    def close(self) -> None:
        """Kept for callers that close readers; no file stays open between calls."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorSpec:
    """Name, shape and dtype of one tensor to write (fixed before any data is written)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def num_bytes(self) -> int:
        """The tensor's size on disk: elements times the dtype's width."""
        numel = 1
        for s in self.shape:
            numel *= s
        return numel * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(specs: list[TensorSpec], *, max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Group ``specs`` in order into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.num_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.num_bytes
    return [s for s in shards if s]


def _header(shard: list[TensorSpec]) -> bytes:
    meta: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in shard:
        if spec.dtype not in _DTYPE_TO_ST:
            raise ValueError(f"tensor {spec.name!r}: dtype {spec.dtype} cannot be stored in safetensors")
        meta[spec.name] = {"dtype": _DTYPE_TO_ST[spec.dtype], "shape": list(spec.shape),
                           "data_offsets": [offset, offset + spec.num_bytes]}
        offset += spec.num_bytes
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as the safetensors library does
    return struct.pack("<Q", len(raw)) + raw


def _write_tensor(f, spec: TensorSpec, tensor: torch.Tensor) -> None:
    if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
        raise ValueError(f"tensor {spec.name!r}: got {tuple(tensor.shape)} {tensor.dtype}, "
                         f"planned {spec.shape} {spec.dtype}")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel():
        f.write(memoryview(flat.view(torch.uint8).numpy()))


def shard_file_names(num_shards: int) -> list[str]:
    """HF's shard names: ``model.safetensors`` alone, else ``model-0000i-of-0000n.safetensors``."""
    if num_shards == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]


def write_safetensors_shards(out_dir: str | os.PathLike, *, specs: list[TensorSpec],
                             tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int,
                             progress=None) -> dict[str, str]:
    """Stream ``tensors`` (in the order of ``specs``) into shards under ``out_dir``; return the weight map.

    Writes ``model.safetensors.index.json`` whenever there is more than one shard. ``progress``: an
    optional callable taking the number of bytes just written (e.g. ``tqdm.update``).
    """
    out_dir = Path(out_dir)
    shards = plan_shards(specs, max_shard_bytes=max_shard_bytes)
    files = shard_file_names(len(shards))
    weight_map: dict[str, str] = {}
    stream: Iterator[tuple[str, torch.Tensor]] = iter(tensors)
    for shard, fname in zip(shards, files):
        with open(out_dir / fname, "wb") as f:
            f.write(_header(shard))
            for spec in shard:
                try:
                    name, tensor = next(stream)
                except StopIteration:
                    raise ValueError(f"tensor stream ended before {spec.name!r}") from None
                if name != spec.name:
                    raise ValueError(f"tensor stream out of order: got {name!r}, planned {spec.name!r}")
                _write_tensor(f, spec, tensor)
                weight_map[name] = fname
                if progress is not None:
                    progress(spec.num_bytes)
            f.flush()
            os.fsync(f.fileno())
    if next(stream, None) is not None:
        raise ValueError("tensor stream has more tensors than planned")
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(s.num_bytes for s in specs)}, "weight_map": weight_map}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return weight_map


def copy_hf_metadata(ref_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Copy config.json, generation_config.json and tokenizer files (every non-weight file) from ``ref_dir``."""
    ref_dir, out_dir = Path(ref_dir), Path(out_dir)
    if not (ref_dir / "config.json").is_file():
        raise FileNotFoundError(f"reference HF directory has no config.json: {ref_dir / 'config.json'}")
    copied = []
    for path in sorted(ref_dir.iterdir()):
        if not path.is_file() or path.name.endswith(_WEIGHT_SUFFIXES) or path.name.endswith(".index.json"):
            continue
        shutil.copy2(path, out_dir / path.name)
        copied.append(path.name)
    return copied
