"""Image–caption pairs from ``.tar`` shards as img2dataset writes them, streamed.

Layout: each shard is an uncompressed tar of samples; a sample is the consecutive
members sharing a key (the member path up to the first dot of its file name)::

    00000.tar: 000000000.jpg 000000000.txt 000000000.json 000000001.png 000000001.txt ...

The image is the first of ``jpg jpeg png webp`` present, the caption the ``txt``
(UTF-8); other members (``json``, ...) are read past. Members are read with the stdlib
``tarfile`` in streaming mode (``'r|'``).

Sharding: the shards (sorted by path) are split over processes — process i of n reads
``shards[i::n]`` — and each process walks its shards in an order drawn per epoch from
(seed, process, epoch) (``shuffle_shards``), then mixes samples through a shuffle
buffer of ``shuffle_buffer`` samples (≤ 1: stream order).

Resumable: ``TarShardSource`` is a ``grain.IterDataset``; its iterator's
``get_state()`` is a JSON-able dict — the epoch, the shard and byte offset of the next
unread sample, the buffer as (shard, byte offset, member count) triples, the number of
draws and the counters — and ``set_state`` re-reads exactly those samples, so a resumed
iterator yields exactly what the uninterrupted one would have.

Damage is skipped and counted in ``stats`` (the counters of the latest iterator, also
``source.stats``): 'skipped_corrupt' (image does not decode), 'skipped_incomplete' (no
image or no caption), 'truncated_shards' (a shard cut inside a member, with an unreadable
header, or without the end-of-archive blocks: every sample before the damage is kept,
a sample with a cut member is dropped; counted on every pass), 'unreadable_shards'
(not a tar at all).
A source whose shards hold no decodable pair fails when it is made.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from unclip_jax.data import DataError
from unclip_jax.data import images

_MASK64 = (1 << 64) - 1
STAT_KEYS = ("yielded", "skipped_corrupt", "skipped_incomplete", "truncated_shards",
             "unreadable_shards")


def hash_ints(*values: int) -> int:
    """A 64-bit hash of integers (splitmix64 chained): cheap, stateless random draws."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x


def list_shards(path: str | Sequence[str]) -> list[str]:
    """Shard paths from a directory (its ``*.tar``), a glob, a file, or a comma list of them."""
    entries = path.split(",") if isinstance(path, str) else list(path)
    shards: list[str] = []
    for entry in (e.strip() for e in entries):
        if not entry:
            continue
        if os.path.isdir(entry):
            shards.extend(glob.glob(os.path.join(entry, "*.tar")))
        elif any(c in entry for c in "*?["):
            shards.extend(p for p in glob.glob(entry) if os.path.isfile(p))
        elif os.path.isfile(entry):
            shards.append(entry)
        else:
            raise DataError(f"tar shard path {entry!r} does not exist")
    return sorted(set(shards))


def _split_name(name: str) -> tuple[str, str]:
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(directory, stem) if directory else stem, ext.lower()


class _Truncated(Exception):
    pass


_DAMAGED = object()  # data of a member that could not be read in full


class _ShardReader:
    """Streams one shard from a byte offset; returns samples (groups of members).

    Damage rule: a sample is lost only when one of its members' data is cut or
    unreadable. A header that cannot be read (the file ends, or garbage) ends the shard
    after the sample already read, which is returned first. Either way the *next* call
    raises ``_Truncated``, so a reader reopened at ``resume_offset`` sees the same damage.
    """

    def __init__(self, path: str, offset: int = 0):
        self.path, self.base = path, offset
        self._file = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._file.seek(offset)
        self._pending: tuple | None = None
        self._tar = None
        try:
            self._tar = tarfile.open(fileobj=self._file, mode="r|")
        except (tarfile.TarError, EOFError, OSError):
            if offset == 0:  # not a tar at all
                self.close()
                raise tarfile.ReadError(f"{path} is not a readable tar file") from None
            # Reopened where an earlier pass met a bad header: the same damage again.
            self._pending = (None, None, _DAMAGED, offset)

    def close(self) -> None:
        self._file.close()

    def _ended_cleanly(self, end: int) -> bool:
        """A finished tar has zero blocks after its last member (two of 512 bytes)."""
        self._file.seek(end)
        tail = self._file.read(1024)
        return len(tail) == 1024 and not any(tail)

    def _next_member(self) -> tuple[str | None, str | None, Any, int] | None:
        """(key, ext, data, header offset) of the next file, None at a clean end.

        data is ``_DAMAGED`` when it cannot be read; key is None for an unreadable header.
        """
        try:
            while True:
                info = self._tar.next()
                if info is None:
                    end = self.base + self._tar.offset
                    return None if self._ended_cleanly(end) else (None, None, _DAMAGED, end)
                if info.isfile():
                    break
        except (tarfile.TarError, EOFError, OSError):
            return None, None, _DAMAGED, self.base + self._tar.offset
        key, ext = _split_name(info.name)
        try:
            data = self._tar.extractfile(info).read()
        except (tarfile.TarError, EOFError, OSError):
            data = _DAMAGED
        return key, ext, data, self.base + info.offset

    def next_group(self) -> tuple[str, dict[str, bytes], int, int] | None:
        """(key, {ext: bytes}, header offset, member count), or None at the shard's end.

        Raises ``_Truncated`` at damage (see the class docstring).
        """
        first = self._pending or self._next_member()
        self._pending = None
        if first is None:
            return None
        key, ext, data, offset = first
        if data is _DAMAGED:
            raise _Truncated
        files, count = {ext: data}, 1
        while True:
            member = self._next_member()
            if member is None or member[0] != key:
                self._pending = member
                return key, files, offset, count
            if member[2] is _DAMAGED:
                raise _Truncated
            files[member[1]] = member[2]
            count += 1

    @property
    def resume_offset(self) -> int | None:
        """Byte offset of the first unread sample, or None when the shard ended cleanly."""
        return self._pending[3] if self._pending is not None else None

    def read_exactly(self, count: int) -> tuple[str, dict[str, bytes]]:
        """The sample of ``count`` members starting at this reader's offset."""
        files, key = {}, None
        for _ in range(count):
            member = self._pending or self._next_member()
            self._pending = None
            if member is None or member[2] is _DAMAGED:
                raise _Truncated
            key = member[0]
            files[member[1]] = member[2]
        return key, files


def decode_sample(files: dict[str, bytes], image_size: int, crop: str,
                  rng: np.random.Generator | None) -> tuple[np.ndarray, str]:
    """(uint8 image, caption) of one sample; ``KeyError`` if a part is missing,
    ``images.CorruptImage`` if the image does not decode."""
    image_ext = next((e for e in images.IMAGE_EXTENSIONS if e in files), None)
    if image_ext is None or "txt" not in files:
        raise KeyError("sample lacks an image or a caption")
    image = images.load_image(files[image_ext], image_size, crop=crop, rng=rng)
    return image, files["txt"].decode("utf-8", errors="replace").strip()


class TarShardSource(grain.IterDataset):
    """Streamed img2dataset shards for one process (see the module docstring).

    Iterating yields ``{'image': uint8 (S, S, 3), 'caption': str, 'key': str}``.

    Args:
      path: a directory of ``*.tar``, a glob, a file, or a comma-separated list of them.
      image_size: side S; images are resized (shortest side) and cropped.
      crop: 'center' or 'random' (offset drawn from (seed, process, draw)).
      shuffle_buffer: samples held for shuffling; ≤ 1 keeps stream order.
      shuffle_shards: walk this process's shards in a per-epoch random order.
      num_epochs: passes over the shards; 0 or None repeats forever.
      seed: shuffling seed of ``iter(source)``; ``source.iterate(seed)`` overrides it.
      process_index, process_count: this process takes ``shards[process_index::process_count]``.
    """

    def __init__(self, path: str | Sequence[str], *, image_size: int = 64, crop: str = "center",
                 shuffle_buffer: int = 1000, shuffle_shards: bool = True,
                 num_epochs: int | None = None, seed: int = 0, process_index: int = 0,
                 process_count: int = 1):
        super().__init__()
        if crop not in images.CROPS:
            raise ValueError(f"crop must be one of {images.CROPS}, got {crop!r}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.path = path
        self.shards = list_shards(path)
        if not self.shards:
            raise DataError(f"no .tar shards found in {path!r}")
        self.local_shards = self.shards[process_index::process_count]
        if not self.local_shards:
            raise DataError(f"process {process_index} of {process_count} gets no shard: only "
                            f"{len(self.shards)} shards in {path!r}; use more shards or fewer "
                            "processes")
        self.image_size, self.crop = int(image_size), crop
        self.shuffle_buffer, self.shuffle_shards = max(1, int(shuffle_buffer)), bool(shuffle_shards)
        self.num_epochs = int(num_epochs or 0)
        self.seed = int(seed)
        self.process_index, self.process_count = process_index, process_count
        self.stats = {k: 0 for k in STAT_KEYS}
        self._probe()

    def _probe(self) -> None:
        """Fails now, with a clear message, when this process's shards hold no usable pair."""
        checked = 0
        for path in self.local_shards:
            try:
                reader = _ShardReader(path)
            except (tarfile.TarError, OSError):
                continue
            try:
                while (group := reader.next_group()) is not None:
                    checked += len(group[1])
                    try:
                        decode_sample(group[1], self.image_size, "center", None)
                        return
                    except (KeyError, images.CorruptImage):
                        continue
            except _Truncated:
                continue
            finally:
                reader.close()
        raise DataError(f"no decodable image/caption pairs found in {self.path!r} (checked "
                        f"{checked} files in {len(self.local_shards)} shards of process "
                        f"{self.process_index})")

    def iterate(self, seed: int | None = None) -> "TarShardIterator":
        """A fresh iterator from the start, shuffled with ``seed`` (default ``self.seed``)."""
        return TarShardIterator(self, self.seed if seed is None else int(seed))

    def __iter__(self) -> "TarShardIterator":
        return self.iterate()

    def __repr__(self) -> str:
        return (f"TarShardSource({self.path!r}, shards={len(self.local_shards)}/"
                f"{len(self.shards)}, process={self.process_index}/{self.process_count}, "
                f"image_size={self.image_size}, shuffle_buffer={self.shuffle_buffer})")


class TarShardIterator(grain.DatasetIterator):
    """The resumable iterator of a ``TarShardSource``; ``get_state()`` is JSON-able."""

    def __init__(self, source: TarShardSource, seed: int):
        super().__init__()
        self._source, self._seed = source, seed
        self._epoch, self._shard_pos, self._offset = 0, 0, 0
        self._reader: _ShardReader | None = None
        # Each buffer entry: [shard id, header offset, member count, key, {ext: bytes}].
        self._buffer: list[list[Any]] = []
        self._draws = 0
        self._groups_in_epoch = 0
        self._exhausted = False
        self.stats = source.stats
        self.stats.update({k: 0 for k in STAT_KEYS})

    # -- reading ------------------------------------------------------------------------
    def _order(self, epoch: int) -> list[int]:
        ids = list(range(len(self._source.local_shards)))
        if self._source.shuffle_shards:
            ids.sort(key=lambda i: hash_ints(self._seed, self._source.process_index, epoch, i))
        return ids

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _next_group(self) -> list[Any] | None:
        """The next sample in stream order, as a buffer entry; None when all epochs are done."""
        src = self._source
        while True:
            order = self._order(self._epoch)
            if self._shard_pos >= len(order):
                if self._groups_in_epoch == 0:
                    raise DataError(f"a whole pass over {src.path!r} (process "
                                    f"{src.process_index}) found no sample")
                self._epoch, self._shard_pos, self._offset = self._epoch + 1, 0, 0
                self._groups_in_epoch = 0
                if src.num_epochs and self._epoch >= src.num_epochs:
                    return None
                continue
            shard = order[self._shard_pos]
            if self._reader is None:
                try:
                    self._reader = _ShardReader(src.local_shards[shard], self._offset)
                except (tarfile.TarError, OSError):
                    self.stats["unreadable_shards"] += 1
                    self._shard_pos, self._offset = self._shard_pos + 1, 0
                    continue
            try:
                group = self._reader.next_group()
            except _Truncated:
                self.stats["truncated_shards"] += 1
                group = None
            if group is not None:
                resume = self._reader.resume_offset
                if resume is None:  # the shard ended right after this sample
                    self._close_reader()
                    self._shard_pos, self._offset = self._shard_pos + 1, 0
                else:
                    self._offset = resume
                self._groups_in_epoch += 1
                key, files, offset, count = group
                return [shard, offset, count, key, files]
            self._close_reader()
            self._shard_pos, self._offset = self._shard_pos + 1, 0

    def __next__(self) -> dict[str, Any]:
        src = self._source
        while True:
            while not self._exhausted and len(self._buffer) < src.shuffle_buffer:
                entry = self._next_group()
                if entry is None:
                    self._exhausted = True
                else:
                    self._buffer.append(entry)
            if not self._buffer:
                raise StopIteration
            draw = self._draws
            self._draws += 1
            j = hash_ints(self._seed, src.process_index, draw) % len(self._buffer)
            entry = self._buffer[j]
            self._buffer[j] = self._buffer[-1]
            self._buffer.pop()
            rng = (np.random.default_rng([self._seed, src.process_index, draw])
                   if src.crop == "random" else None)
            try:
                image, caption = decode_sample(entry[4], src.image_size, src.crop, rng)
            except KeyError:
                self.stats["skipped_incomplete"] += 1
                continue
            except images.CorruptImage:
                self.stats["skipped_corrupt"] += 1
                continue
            self.stats["yielded"] += 1
            return {"image": image, "caption": caption, "key": entry[3]}

    # -- checkpointing ------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """The position as a small JSON-able dict (the buffer as shard/offset/count)."""
        return {
            "seed": self._seed,
            "num_shards": len(self._source.local_shards),
            "epoch": self._epoch,
            "shard_pos": self._shard_pos,
            "offset": self._offset,
            "groups_in_epoch": self._groups_in_epoch,
            "exhausted": self._exhausted,
            "draws": self._draws,
            "buffer": [[e[0], e[1], e[2]] for e in self._buffer],
            "stats": dict(self.stats),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores ``get_state()``: re-reads the buffered samples from their offsets."""
        src = self._source
        if isinstance(state, (str, bytes)):
            state = json.loads(state)
        if state.get("num_shards") != len(src.local_shards):
            raise DataError(f"iterator state is for {state.get('num_shards')} shards, this "
                            f"process has {len(src.local_shards)}; the shard set changed")
        self._close_reader()
        self._seed = int(state["seed"])
        self._epoch, self._shard_pos = int(state["epoch"]), int(state["shard_pos"])
        self._offset = int(state["offset"])
        self._groups_in_epoch = int(state["groups_in_epoch"])
        self._exhausted, self._draws = bool(state["exhausted"]), int(state["draws"])
        self.stats.clear()
        self.stats.update({k: int(state["stats"].get(k, 0)) for k in STAT_KEYS})
        self._buffer = []
        for shard, offset, count in state["buffer"]:
            reader = _ShardReader(src.local_shards[shard], offset)
            try:
                key, files = reader.read_exactly(count)
            except _Truncated as e:
                raise DataError(f"cannot restore the shuffle buffer: shard "
                                f"{src.local_shards[shard]} changed at byte {offset}") from e
            finally:
                reader.close()
            self._buffer.append([shard, offset, count, key, files])

    def close(self) -> None:
        self._close_reader()
        super().close()

    def __del__(self):
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.close()


def iterate_pairs(path: str, **kwargs) -> Iterator[dict[str, Any]]:
    """Convenience: ``iter(TarShardSource(path, **kwargs))``."""
    return iter(TarShardSource(path, **kwargs))
