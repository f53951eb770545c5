"""Prepared token shards and the loaders that cut them into batches.

A split (train or val) is one long stream of token ids, documents packed back to back with EOS
between them (so every window is full: no padding is ever needed). Loaders cut windows out of it:

    RandomWindows       nanoGPT's get_batch: windows at random offsets
    SequentialWindows   consecutive windows in order (an epoch over the split)

Batch ``i`` of a loader is a pure function of ``(seed, i)``, so a run's data position is just the
index of its next batch: resuming, or splitting a global batch over processes, replays exactly the
windows a single uninterrupted process would have seen.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from lmforge.data.prepare import FORMAT, DataError

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from several integers (splitmix64 steps), stable across runs."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def generator(*values: int) -> torch.Generator:
    """A CPU generator seeded by ``mix_seed(*values)``."""
    return torch.Generator().manual_seed(mix_seed(*values))


class TokenStream:
    """One split: its shards memory-mapped and read as one array of token ids."""

    def __init__(self, files: list[Path], dtype: np.dtype):
        self.arrays = [np.memmap(f, dtype=dtype, mode="r") for f in files]
        sizes = [len(a) for a in self.arrays]
        self.starts = np.cumsum([0, *sizes])  # shard k covers [starts[k], starts[k+1])
        self.n = int(self.starts[-1])

    def __len__(self) -> int:
        return self.n

    def windows(self, starts, length: int) -> torch.Tensor:
        """(len(starts), length) int64 tensor; row i holds tokens starts[i] .. starts[i]+length-1."""
        starts = np.asarray(starts, dtype=np.int64)
        offsets = np.arange(length, dtype=np.int64)
        if len(self.arrays) == 1:
            rows = self.arrays[0][starts[:, None] + offsets]  # one gather for the whole batch
        else:
            rows = np.stack([self._read(int(s), length) for s in starts])
        return torch.from_numpy(rows.astype(np.int64))

    def _read(self, start: int, length: int) -> np.ndarray:
        out, pos, end = [], start, start + length
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        while pos < end:
            lo = pos - self.starts[k]
            take = min(end, self.starts[k + 1]) - pos
            out.append(self.arrays[k][lo : lo + take])
            pos += take
            k += 1
        return np.concatenate(out)


class TokenData:
    """A directory written by ``lmforge.data.prepare``: meta.json, shards and the tokenizer."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise DataError(f"{self.path} is not a prepared dataset (no meta.json); run `lmforge data prepare` first.")
        try:
            self.meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{meta_file} is not valid JSON ({e.msg}); prepare the data again.") from None
        if self.meta.get("format") != FORMAT:
            raise DataError(f"{meta_file} was not written by lmforge.data.prepare; prepare the data again.")
        self.dtype = np.dtype(self.meta["dtype"])
        self.vocab_size = int(self.meta["vocab_size"])
        self._streams: dict[str, TokenStream] = {}
        self._tokenizer = None

    def __repr__(self) -> str:
        s = self.meta["splits"]
        return f"TokenData({self.path}, train={s['train']['tokens']:,}, val={s['val']['tokens']:,}, vocab={self.vocab_size})"

    def split(self, name: str) -> TokenStream:
        if name not in self.meta["splits"]:
            raise DataError(f"{self.path} has no {name!r} split; it has {', '.join(self.meta['splits'])}.")
        if name not in self._streams:
            shards = self.meta["splits"][name]["shards"]
            files = [self.path / s["file"] for s in shards]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise DataError(f"{self.path} is missing shard(s) {', '.join(missing)}; prepare the data again.")
            self._streams[name] = TokenStream(files, self.dtype)
        return self._streams[name]

    def tokenizer(self):
        if self._tokenizer is None:
            from lmforge.tokenizer import TokenizerError, load_tokenizer

            try:
                self._tokenizer = load_tokenizer(self.path)
            except TokenizerError as e:
                raise DataError(f"{self.path}: {e}") from None
        return self._tokenizer


def _check_length(stream: TokenStream, length: int, what: str) -> None:
    if len(stream) < length:
        raise DataError(
            f"the {what} split has {len(stream)} tokens, fewer than one window of {length}; "
            "use more text or a smaller block_size."
        )


class RandomWindows:
    """nanoGPT's get_batch: ``batch_size`` windows of ``length`` tokens at uniformly random offsets."""

    def __init__(self, stream: TokenStream, length: int, batch_size: int, seed: int, what: str = "train"):
        _check_length(stream, length, what)
        self.stream, self.length, self.batch_size, self.seed = stream, length, batch_size, seed

    def starts(self, gen: torch.Generator) -> np.ndarray:
        return torch.randint(len(self.stream) - self.length + 1, (self.batch_size,), generator=gen).numpy()

    def batch(self, index: int, gen: torch.Generator) -> torch.Tensor:
        """(batch_size, length) tokens of batch ``index``; draws its offsets from ``gen``."""
        return self.stream.windows(self.starts(gen), self.length)

    def state_dict(self, next_index: int) -> dict:
        return {"loader": "random", "seed": self.seed, "next_batch": next_index, "tokens": len(self.stream)}


class SequentialWindows:
    """Consecutive windows of ``length`` tokens, ``stride`` apart, in order; batch ``i`` holds windows
    ``i*B .. i*B+B-1`` (modulo the number of windows: the split is walked again, epoch after epoch)."""

    def __init__(self, stream: TokenStream, length: int, batch_size: int, stride: int | None = None, what: str = "train"):
        _check_length(stream, length, what)
        self.stream, self.length, self.batch_size = stream, length, batch_size
        self.stride = stride or length
        self.n_windows = (len(stream) - length) // self.stride + 1

    def __len__(self) -> int:
        """Batches per epoch (the last one wraps around)."""
        return -(-self.n_windows // self.batch_size)

    def batch(self, index: int, gen: torch.Generator | None = None) -> torch.Tensor:
        rows = (index * self.batch_size + np.arange(self.batch_size)) % self.n_windows
        return self.stream.windows(rows * self.stride, self.length)

    def state_dict(self, next_index: int) -> dict:
        return {
            "loader": "sequential", "next_batch": next_index, "tokens": len(self.stream),
            "epoch": next_index * self.batch_size // self.n_windows,
        }
