"""Checkpoint tensors on disk, read and written one tensor at a time.

`CheckpointReader` reads the tensors of a Hugging Face checkpoint directory (single or sharded safetensors; pickle
`.bin` files only when the caller opts in) with positioned reads (`os.pread`) at the offsets in the safetensors
header. Unlike a memory map, whose touched pages stay resident for as long as the file is open, a positioned read
holds only the tensor asked for, so streaming a whole checkpoint keeps the peak memory near its largest tensor;
reads also release the GIL, so worker threads can read in parallel.

`ShardedSafetensorsWriter` writes a checkpoint whose tensor names, shapes and dtypes are known up front: the
shard plan and every header are fixed first, then each tensor is written at its offset (`os.pwrite`) as soon as it
is ready, in any order, and dropped. The files are standard safetensors (`safe_open`, transformers and vLLM read
them) with a `model.safetensors.index.json` when there is more than one shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .outputs import read_weight_map

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Files that travel with the weights: tokenizer and generation settings.
TOKENIZER_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
    "chat_template.json",
)
# Any one of these makes a tokenizer (a fast tokenizer, a sentencepiece model, a BPE or WordPiece vocabulary).
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def has_tokenizer(ckpt: str | Path) -> bool:
    """Whether the checkpoint directory `ckpt` holds a tokenizer."""
    return any((Path(ckpt) / name).is_file() for name in TOKENIZER_VOCAB_FILES)


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer and generation-config files present in `src` to `dst`; returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # safetensors name, e.g. "BF16"
    file: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype].itemsize if self.dtype in DTYPES else 0


class SafetensorsFile:
    """One safetensors file: its header, and tensors read on demand with positioned reads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        header, self._data_start = _read_header(self.path)
        data_size = self.path.stat().st_size - self._data_start
        metadata = header.pop("__metadata__", None) or {}
        self.metadata: dict[str, str] = metadata if isinstance(metadata, dict) else {}
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {
            name: _header_entry(self.path, name, entry, data_size) for name, entry in header.items()
        }
        self._fd: int | None = None

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        buf = bytearray(end - begin)
        self._pread(name, memoryview(buf), begin)
        if not buf:
            return torch.empty(shape, dtype=DTYPES[dtype])
        return torch.frombuffer(buf, dtype=DTYPES[dtype]).reshape(shape)

    def read_into(self, name: str, start: int, out: torch.Tensor) -> None:
        """Entries [start, start + out.numel()) of tensor `name`, flattened, into the contiguous `out` (of the
        tensor's dtype): a block read into a buffer the caller reuses, so no memory is allocated (or faulted in)."""
        dtype, _, begin, end = self.entries[name]
        size = DTYPES[dtype].itemsize
        first = begin + start * size
        if out.dtype != DTYPES[dtype] or not out.is_contiguous() or first + out.numel() * size > end:
            raise ValueError(f"{self.path}: a read of {out.numel()} {out.dtype} entries of {name!r} from {start} does "
                             f"not fit the tensor ({(end - begin) // size} {dtype} entries).")
        self._pread(name, memoryview(out.view(-1).view(torch.uint8).numpy()), first)

    def _pread(self, name: str, view: memoryview, offset: int) -> None:
        """Fill `view` from the data section at byte `offset` (positioned reads, which release the GIL)."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], self._data_start + offset + done)
            if got == 0:
                raise OSError(f"{self.path}: unexpected end of file while reading {name!r}.")
            done += got

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_REDO = "download or write it again"


def _read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data starts; errors name the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else 0
        if not 2 <= n <= min(size - 8, 100_000_000):
            raise ValueError(f"{path} is not a safetensors file or is truncated: its first 8 bytes give a header of "
                             f"{n} bytes, which does not fit the file's {size} bytes; {_REDO}.")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} has a corrupt safetensors header ({err}); {_REDO}.") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a corrupt safetensors header (a JSON {type(header).__name__}, not an object); "
                         f"{_REDO}.")
    return header, 8 + n


def _header_entry(path: Path, name: str, entry: object, data_size: int) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one tensor's header entry, checked against the bytes the file holds."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize if dtype in DTYPES else None
        valid = nbytes is None or 0 <= begin <= end and end - begin == nbytes
    except (TypeError, KeyError, ValueError):
        raise ValueError(f"{path}: the header entry of tensor {name!r} is malformed ({str(entry)[:120]}); "
                         f"{_REDO}.") from None
    if nbytes is None:
        raise ValueError(f"{path}: tensor {name!r} has dtype {dtype!r}, which suture does not read (it reads "
                         f"{', '.join(DTYPES)}).")
    if not valid:
        raise ValueError(f"{path}: tensor {name!r} has data offsets {[begin, end]} that do not match its shape "
                         f"{list(shape)} and dtype {dtype}; {_REDO}.")
    if end > data_size:
        raise ValueError(f"{path} is truncated: tensor {name!r} ends at byte {end} of the data section, which holds "
                         f"{data_size} bytes; {_REDO}.")
    return dtype, shape, begin, end


def checkpoint_files(ckpt: str | Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a checkpoint directory (or a single file): safetensors, else pickle if allowed."""
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise FileNotFoundError(f"{ckpt} does not exist.")
    if ckpt.is_file():
        files = [ckpt]
    else:
        files = _listed_or_globbed(ckpt, "model.safetensors.index.json", "*.safetensors")
        if not files:
            pickles = _listed_or_globbed(ckpt, "pytorch_model.bin.index.json", "*.bin") + sorted(ckpt.glob("*.pt*"))
            if not pickles:
                raise FileNotFoundError(f"No weights found in {ckpt}: expected *.safetensors "
                                        "(or model.safetensors.index.json with its shards).")
            if not allow_pickle:
                raise ValueError(
                    f"{ckpt} holds only pickle weights ({', '.join(p.name for p in pickles[:3])}), which can run "
                    "arbitrary code when loaded. Pass --allow-pickle (Python: allow_pickle=True) to load them with "
                    "torch.load(weights_only=True), or convert them to safetensors first."
                )
            files = pickles
    for path in files:
        if not path.exists():
            raise FileNotFoundError(f"Shard {path.name} listed in the index of {ckpt} is missing.")
    return files


def _listed_or_globbed(ckpt: Path, index_name: str, pattern: str) -> list[Path]:
    index = ckpt / index_name
    if index.exists():
        return [ckpt / name for name in sorted(set(read_weight_map(index).values()))]
    return sorted(ckpt.glob(pattern))


class CheckpointReader:
    """The tensors of a checkpoint, by name, read one at a time (see the module docstring)."""

    def __init__(self, ckpt: str | Path, allow_pickle: bool = False):
        self.path = Path(ckpt)
        self.files = checkpoint_files(ckpt, allow_pickle)
        self.index: dict[str, TensorInfo] = {}
        self._source: dict[str, SafetensorsFile | dict] = {}
        for path in self.files:
            if path.suffix == ".safetensors":
                handle = SafetensorsFile(path)
                items = [(n, dtype, shape) for n, (dtype, shape, _, _) in handle.entries.items()]
            else:  # opted-in pickle: tensors only (weights_only), memory-mapped so nothing is read twice
                handle = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                items = [(n, DTYPE_NAMES[t.dtype], tuple(t.shape)) for n, t in handle.items()]
            for name, dtype, shape in items:
                if name in self.index:
                    raise ValueError(f"Tensor {name!r} appears in both {self.index[name].file} and {path}.")
                self.index[name] = TensorInfo(shape, dtype, str(path))
                self._source[name] = handle

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def read(self, name: str) -> torch.Tensor:
        if name not in self.index:
            raise KeyError(f"{self.path} has no tensor {name!r}.")
        source = self._source[name]
        return source.read(name) if isinstance(source, SafetensorsFile) else source[name].clone()

    def read_into(self, name: str, start: int, out: torch.Tensor) -> None:
        """Entries [start, start + out.numel()) of tensor `name`, flattened, into `out` (see
        `SafetensorsFile.read_into`)."""
        if name not in self.index:
            raise KeyError(f"{self.path} has no tensor {name!r}.")
        source = self._source[name]
        if isinstance(source, SafetensorsFile):
            source.read_into(name, start, out)
        else:
            out.copy_(source[name].reshape(-1)[start : start + out.numel()])

    def sha256(self, on_bytes: Callable[[int], None] | None = None) -> dict[str, str]:
        """SHA-256 of every weight file (read in 8 MiB blocks)."""
        digests = {}
        for path in self.files:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(8 << 20):
                    h.update(block)
                    if on_bytes:
                        on_bytes(len(block))
            digests[path.name] = h.hexdigest()
        return digests

    def close(self) -> None:
        for handle in self._source.values():
            if isinstance(handle, SafetensorsFile):
                handle.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


SIZE_FORMS = "a number of bytes or a number with a unit, e.g. '5GB', '500MB' or '2GiB'"


# Units of a size, as transformers' `convert_file_size_to_int` reads them (its import costs a merge ~0.5 s):
# binary with an "i", decimal without, and a lowercase final "b" (e.g. "5Gb") counts bits.
_UNITS = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3}


def parse_size(size: int | str, name: str = "size") -> int:
    """Bytes from an int, a string of digits, or a string such as "5GB" / "500MiB" (transformers' convention);
    errors name the parameter `name`."""
    text = str(size).strip()
    unit = next((u for u in _UNITS if text.upper().endswith(u)), None)
    try:
        if isinstance(size, int) or text.isdigit():
            value = int(text)
        elif unit is None:
            value = 0
        else:
            value = int(text[: -len(unit)]) * _UNITS[unit]
            value = value // 8 if len(unit) == 2 and text.endswith("b") else value
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{name} must be a positive size, {SIZE_FORMS}; got {size!r}.")
    return value


class ShardedSafetensorsWriter:
    """Write a safetensors checkpoint (sharded above `max_shard_size`) whose tensor list is known up front.

    Args:
        out_dir: an existing (normally temporary) directory.
        tensors: (name, shape, dtype) of every tensor, in the order they should appear.
        max_shard_size: shard byte limit (int or "5GB"); a tensor larger than the limit gets a shard of its own.
    """

    def __init__(self, out_dir: str | Path, tensors: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_size: int | str = "5GB", metadata: dict[str, str] | None = None):
        limit = parse_size(max_shard_size, "max_shard_size")
        self.out_dir = Path(out_dir)
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for name, shape, dtype in tensors:
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and size + nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype))
            size += nbytes
        n = len(shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._slots: dict[str, tuple[int, int, tuple[int, ...], torch.dtype]] = {}  # name -> (fd, offset, ...)
        self._fds: list[int] = []
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        for file_name, shard in zip(names, shards):
            header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
            for name, shape, dtype in shard:
                if name in self.weight_map:
                    raise ValueError(f"Tensor {name!r} is listed twice.")
                nbytes = math.prod(shape) * dtype.itemsize
                header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                self.weight_map[name] = file_name
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
            fd = os.open(self.out_dir / file_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            self._fds.append(fd)
            with _naming(self.out_dir / file_name):
                os.pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
                os.ftruncate(fd, 8 + len(raw) + offset)
            for name, shape, dtype in shard:
                begin = header[name]["data_offsets"][0]
                self._slots[name] = (fd, 8 + len(raw) + begin, shape, dtype)
            self.total_size += offset
        self._pending = set(self._slots)
        self._written: dict[str, int] = {}  # bytes written so far of the tensors written in parts

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._slots:
            raise KeyError(f"Tensor {name!r} is not in the output plan.")
        fd, offset, shape, dtype = self._slots[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"Tensor {name!r}: planned {list(shape)} {dtype}, got {list(tensor.shape)} {tensor.dtype}.")
        self._pwrite(name, fd, tensor.detach().to("cpu").contiguous(), offset)
        self._pending.discard(name)

    def write_part(self, name: str, start: int, part: torch.Tensor) -> None:
        """Write the contiguous `part` as entries [start, start + part.numel()) of tensor `name`, flattened. A tensor
        written in parts counts as written once its parts have covered its bytes; each part is written by one thread
        and parts must not overlap."""
        if name not in self._slots:
            raise KeyError(f"Tensor {name!r} is not in the output plan.")
        fd, offset, shape, dtype = self._slots[name]
        nbytes = part.numel() * dtype.itemsize
        if part.dtype != dtype or not part.is_contiguous() or start < 0 or start + part.numel() > math.prod(shape):
            raise ValueError(f"Tensor {name!r}: a part of {part.numel()} {part.dtype} entries at {start} does not fit "
                             f"the planned {list(shape)} {dtype}.")
        self._pwrite(name, fd, part, offset + start * dtype.itemsize)
        written = self._written.get(name, 0) + nbytes
        if written >= math.prod(shape) * dtype.itemsize:
            self._written.pop(name, None)
            self._pending.discard(name)
        else:
            self._written[name] = written

    def _pwrite(self, name: str, fd: int, data: torch.Tensor, offset: int) -> None:
        """Write the bytes of the contiguous CPU tensor `data` at byte `offset` of `fd` (positioned writes, which
        release the GIL); an OS error names the shard file."""
        view, done = memoryview(data.reshape(-1).view(torch.uint8).numpy()), 0
        with _naming(self.out_dir / self.weight_map[name]):
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)

    def _close_files(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def close(self) -> None:
        """Finish the checkpoint: every planned tensor must have been written; writes the index if sharded."""
        self._close_files()
        if self._pending:
            missing = sorted(self._pending)
            raise RuntimeError(f"{len(missing)} planned tensors were never written, e.g. {missing[:5]}.")
        if len(set(self.weight_map.values())) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
            with _naming(self.out_dir / "model.safetensors.index.json") as path:
                path.write_text(json.dumps(index, indent=2) + "\n")

    def __enter__(self) -> ShardedSafetensorsWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self._close_files()  # the caller's atomic output directory discards the partial files


@contextlib.contextmanager
def _naming(path: Path):
    """Yield `path`; an OSError raised inside without a file name (os.pwrite on a full disk names none) gets it."""
    try:
        yield path
    except OSError as err:
        if err.filename is None:
            err.filename = str(path)
        raise
