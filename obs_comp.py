"""Frame stores: the newest `capacity` frames of a stream, raw (`half`) or differentially encoded (`full`).

A frame store keeps the most recent `capacity` frames appended to it and decodes any of them by
global frame id (the number of frames appended before it). It knows nothing about transitions,
stacks or sampling; `replay_buffer.py` and `sb3_buffers.py` build those on top. A front end that
keeps fewer frames than `capacity` says so with `release(before)`, and their memory goes back.

Where each mechanism lives (docs/codec.md walks through them):
  * the byte format of `full` (anchors, keys, byte runs, packed residuals): kernels.py, section 1;
  * a store's state as named fields of one kernel block: kernels.py section 3 (STATE, store_views);
  * the arena, its sizing and the pages handed back: kernels.py section 4, and _AddressSpace here;
  * appending: kernels.append_frame (section 5), finished here where it returns an outcome;
  * decoding: kernels.decode_runs and kernels.walk (section 6), in threads from here;
  * policy, settings, saving and loading: RawFrames, DiffFrames and DiffScratch below.

Front ends' own numba kernels append with `kernels.append_frame(frame, episode_start, *store.kernel_args)`;
where it returns an outcome (< 0) instead of an id, `store.finish_append(frame, episode_start, outcome)`
completes the job in Python.

Memory. Each store reserves address space for its worst case (every frame raw) up front, as one
anonymous mapping: a page becomes resident when a payload is first written to it, and pages that
only old frames used are handed back to the OS (madvise) as the oldest kept frame moves on. So a
store never copies its payload to grow, and `nbytes` counts the bytes actually resident. Besides its
payload and index, a store that packs residuals keeps copies of its current key frame and of the last
frame; without packing the encoder reads the anchor from the arena and rebuilds the key there into a
row shared by the stores of one DiffScratch, so a store costs next to nothing before its frames.
"""
from __future__ import annotations

import math
import mmap
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np

import kernels
from kernels import (ALONE_PACKED, ANCHOR_PACKED, DIFF_STORE, PACKED_CHANNELS, PAGE, PAGES_BACK_FIRST,
                     PREV_PACKED, RAW, RAW_STORE, RUNS, WORK_ROWS, Rows, append_frame, arena_extent, arena_size,
                     check_index, decode_runs, index_views, needs_entropy, new_block, packed_bound, pages_to_free,
                     resident_arena, state_record, walk)

COMPRESSIONS = ("half", "full")  # the in-RAM modes every front end offers
_UINT8 = np.dtype(np.uint8)
_RELEASE_CHUNK = 1 << 16  # pages go back to the OS in steps of at least this many bytes
MIN_ENTROPY_SAVING = 1024  # DiffFrames' default: bytes a packed frame must save on its byte runs
_LAYOUT_FIELDS = ("channels", "height", "width", "channel_stride", "pixel_stride")  # kernels.STATE's frame_layout
# Linux's default overcommit heuristic refuses a private mapping larger than RAM + swap unless it
# asks for no reservation; the pages are still allocated (and counted) when written.
_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)
__all__ = ["COMPRESSIONS", "FrameStore", "RawFrames", "DiffFrames", "DiffScratch", "make_frame_store",
           "bytes_per_step", "check_saved_arrays", "decode_thread_count", "RAW", "RUNS", "PREV_PACKED",
           "ANCHOR_PACKED", "ALONE_PACKED"]


class FrameStore(Protocol):
    """Keeps the newest `capacity` frames and decodes them by global frame id."""

    capacity: int
    kernel_args: tuple[np.ndarray, np.ndarray, np.ndarray]  # what kernels.append_frame takes after the frame

    @property
    def nbytes(self) -> int: ...

    @property
    def content_nbytes(self) -> int: ...

    @property
    def count(self) -> int: ...

    def append(self, frame: np.ndarray, episode_start: bool) -> int: ...

    def finish_append(self, frame: np.ndarray, episode_start: bool, outcome: int) -> int: ...

    def decode(self, ids: np.ndarray, out: np.ndarray) -> None: ...

    def release(self, before: int) -> None: ...

    def state_dict(self) -> dict[str, np.ndarray]: ...

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None: ...


def bytes_per_step(nbytes: int, content_nbytes: int, capacity: int, stored: int) -> float:
    """RAM per stored step of a buffer when full: what is sized by capacity over capacity, what grows with what is
    stored (content_nbytes of nbytes) over the steps stored."""
    return (nbytes - content_nbytes) / capacity + content_nbytes / max(stored, 1)


def check_saved_arrays(state: dict, expected: dict[str, tuple], what: str = "saved") -> None:
    """Raise ValueError unless each state[name] is an array of the expected (shape, dtype); a shape may be None
    (any) or hold None for a dimension of any length."""
    for name, (shape, dtype) in expected.items():
        array = np.asarray(state[name])
        fits = shape is None or (array.ndim == len(shape) and all(
            want is None or have == want for have, want in zip(array.shape, shape)))
        if not fits or array.dtype != dtype:
            wanted = "any shape" if shape is None else tuple("n" if n is None else n for n in shape)
            raise ValueError(f"{what} {name} has shape {array.shape} and dtype {array.dtype}; "
                             f"expected {wanted} {np.dtype(dtype)}")


class _AddressSpace:
    """Reserved anonymous memory: a page is resident once written, until handed back with release()."""

    def __init__(self, size: int):
        self.size = -(-max(size, 1) // PAGE) * PAGE
        try:
            self._map = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _NORESERVE)
        except OSError as error:
            raise MemoryError(f"cannot reserve {self.size / 2**30:.1f} GiB of address space for a frame store "
                              f"({error}); a strict vm.overcommit_memory or `ulimit -v` forbids reserving more "
                              "than RAM: lower the buffer capacity or lift the limit") from error
        self.array = np.frombuffer(self._map, dtype=np.uint8)

    def release(self, start: int, length: int) -> None:
        """Hand back the whole pages of the circular byte range [start, start + length); they read as zeros."""
        for begin, end in ((start, min(start + length, self.size)), (0, start + length - self.size)):
            begin = -(-begin // PAGE) * PAGE
            end -= end % PAGE
            if end > begin:
                self._map.madvise(mmap.MADV_DONTNEED, begin, end - begin)


class RawFrames:
    """`half`: every frame stored once, uncompressed, in a ring of `capacity` frames."""

    def __init__(self, capacity: int, frame_shape: tuple[int, ...]):
        self.capacity = capacity
        self.frame_size = math.prod(frame_shape)
        self._space = _AddressSpace(capacity * self.frame_size)
        self._frames = self._space.array[:capacity * self.frame_size].reshape(capacity, self.frame_size)
        self._block = new_block(RAW_STORE, capacity, self.frame_size)
        self._state = state_record(self._block)  # only its count changes, in append_frame
        self._first_needed = 0  # release(before) promises no decode below this id
        self._freed = 0  # frames below this id had their pages handed back
        self.kernel_args = (self._block, self._space.array, _NO_ROWS)  # what append_frame takes for this store

    @property
    def nbytes(self) -> int:
        return self.content_nbytes

    @property
    def content_nbytes(self) -> int:
        """Bytes that grow with what is stored rather than with capacity: the resident frames."""
        count = self.count
        return (count - max(self._freed, count - self.capacity)) * self.frame_size

    @property
    def count(self) -> int:
        """Frames appended so far: the next frame's id."""
        return int(self._state["count"])

    def append(self, frame: np.ndarray, episode_start: bool) -> int:
        """Store `frame` as the next frame id; that id."""
        return append_frame(_as_row(frame, self.frame_size), episode_start, *self.kernel_args)

    def finish_append(self, frame: np.ndarray, episode_start: bool, outcome: int) -> int:
        """The id append_frame returned: a raw store always stores the frame there."""
        return outcome

    def decode(self, ids: np.ndarray, out: np.ndarray) -> None:
        """Write the frames `ids` (M,) into `out` (M, C*H*W) uint8; ValueError for ids not held or a bad `out`."""
        ids = check_decode(ids, out, max(self.count - self.capacity, self._first_needed), self.count, self.frame_size)
        # mode='wrap' maps ids to ring slots, and unlike the default mode it writes `out` unbuffered
        np.take(self._frames, ids, axis=0, out=out, mode="wrap")

    def release(self, before: int) -> None:
        """Frames with id < `before` will not be decoded again: hand their memory back."""
        count = self.count
        self._first_needed = max(self._first_needed, min(before, count))
        start = max(self._freed, count - self.capacity)  # below, the ring already holds newer frames
        if (self._first_needed - start) * self.frame_size >= _RELEASE_CHUNK:
            self._space.release((start % self.capacity) * self.frame_size,
                                (self._first_needed - start) * self.frame_size)
            self._freed = self._first_needed

    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain arrays (no pickled objects) that restore this store through load_state_dict."""
        count = self.count
        return {"config": np.array([self.capacity, self.frame_size], dtype=np.int64),
                "counters": np.array([count, self._first_needed], dtype=np.int64),
                "frames": self._frames[:min(count, self.capacity)]}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what state_dict saved into this (empty or not) store of the same configuration."""
        _check_config("half", state, [self.capacity, self.frame_size])
        check_saved_arrays(state, {"counters": ((2,), np.int64)})
        count, first_needed = (int(x) for x in state["counters"])
        if not 0 <= first_needed <= count:
            raise ValueError(f"saved counters {[count, first_needed]} (frames appended, first needed) are inconsistent")
        check_saved_arrays(state, {"frames": ((min(count, self.capacity), self.frame_size), np.uint8)})
        frames = np.asarray(state["frames"])
        self._frames[:len(frames)] = frames
        self._state["count"], self._first_needed, self._freed = count, first_needed, 0

    def __getstate__(self) -> dict:
        return {"args": (self.capacity, (self.frame_size,)), "state": self.state_dict()}

    def __setstate__(self, pickled: dict) -> None:
        self.__init__(*pickled["args"])
        self.load_state_dict(pickled["state"])


def decode_thread_count(setting: int | str) -> int:
    """Threads a `decode_threads` setting means: an integer >= 1, or "auto", the cores this process may use."""
    if setting == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if isinstance(setting, bool) or not isinstance(setting, (int, np.integer)) or setting < 1:
        raise ValueError(f"decode_threads must be an integer >= 1 or 'auto', got {setting!r}")
    return int(setting)


class DiffScratch:
    """Work rows of DiffFrames' encoder and decoder, shared by stores of one frame size.

    Appends to the stores of one scratch come from one thread at a time (they share the encoder rows); decodes may
    come from any number of threads: the decoder rows are used under `decode_lock`, so that decodes
    of entropy-coded frames take turns (decodes of byte runs need no rows, and run side by side)."""

    def __init__(self, frame_size: int, decode_threads: int | str = "auto"):
        self.frame_size = frame_size
        self.decode_threads = decode_thread_count(decode_threads)
        # encoder rows (kernels.HEADERS ...): a frame's byte runs, a key rebuilt from the arena (stores that do not
        # pack keep no copy of their key), residual planes and two packed payloads
        self.encoder = np.empty((6, packed_bound(frame_size)), dtype=np.uint8)
        # per decode thread: its work rows and residual planes, allocated by its first decode of a packed frame
        # (stores that hold none never need them)
        self.decoders = [[np.empty(0, dtype=np.uint8), np.empty(0, dtype=np.uint8)]
                         for _ in range(self.decode_threads)]
        self.pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="frame-decode") \
            if self.decode_threads > 1 else None
        self.decode_lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes of every row: the encoder's, and the decoders' once they decoded packed frames."""
        return self.encoder.nbytes + self.decode_nbytes

    @property
    def decode_nbytes(self) -> int:
        """Bytes of the decoders' rows: per thread two work frames and one frame's residual planes."""
        return sum(work.nbytes + planes.nbytes for work, planes in self.decoders)

    def decoder_rows(self, thread: int) -> list[np.ndarray]:
        """Thread `thread`'s [work rows, residual planes], allocated on first use."""
        rows = self.decoders[thread]
        if rows[0].size == 0:
            rows[0] = np.empty(WORK_ROWS * self.frame_size, dtype=np.uint8)
            rows[1] = np.empty(packed_bound(self.frame_size), dtype=np.uint8)
        return rows

    def __getstate__(self) -> dict:
        return {"frame_size": self.frame_size, "decode_threads": self.decode_threads}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["frame_size"], state["decode_threads"])


class DiffFrames:
    """`full`: anchors raw; every other frame in the cheapest of byte runs or a packed residual.

    capacity: frames kept. frame_shape: shape of one frame (uint8). key_interval, anchor_interval: frames between
    keys and between anchors within an episode (kernels.py, section 1). entropy: allow packed residuals (an
    entropy coder: a few bits per byte where the image moved). min_entropy_saving: bytes a packed frame must save
    on its byte runs (its decode reads the whole frame where runs cost a few memcpys). decode_threads: threads
    that decode the packed frames of one batch, or "auto" (the cores the process may use). scratch: a DiffScratch
    to share with other stores.
    """

    def __init__(self, capacity: int, frame_shape: tuple[int, ...], key_interval: int, anchor_interval: int,
                 entropy: bool = True, min_entropy_saving: int = MIN_ENTROPY_SAVING, decode_threads: int | str = "auto",
                 scratch: DiffScratch | None = None):
        if key_interval < 1 or anchor_interval < 1:
            raise ValueError(f"key_interval and anchor_interval must be >= 1, got {key_interval} and {anchor_interval}")
        frame_size = math.prod(frame_shape)
        threads = decode_thread_count(decode_threads)
        if scratch is not None and (scratch.frame_size, scratch.decode_threads) != (frame_size, threads):
            raise ValueError(f"scratch is for frames of {scratch.frame_size} bytes and {scratch.decode_threads} decode "
                             f"threads, this store has {frame_size} and {threads}")
        self.capacity = capacity
        self.frame_shape = tuple(frame_shape)
        self.key_interval = key_interval
        self.anchor_interval = anchor_interval
        self.entropy = entropy
        self.min_entropy_saving = min_entropy_saving
        self.decode_threads = decode_threads
        self.frame_size = frame_size
        self._owns_scratch = scratch is None  # a shared one is counted by whoever shares it
        self._scratch = DiffScratch(frame_size, threads) if scratch is None else scratch
        layout = frame_layout(self.frame_shape)
        # A frame's references reach back at most anchor_interval - 1 frames, so that many extra
        # slots keep every reference of the newest `capacity` frames decodable.
        self._slots = capacity + anchor_interval - 1
        # Packing residuals takes two reference rows: copies of the group's key and of the last frame.
        self._block = new_block(DIFF_STORE, self._slots, frame_size, -(-frame_size // 8) * 8, 2 if entropy else 0)
        self._state = state_record(self._block)
        self._refs, self._offsets, self._kinds, self._params, self._ref_dist = index_views(self._block)
        self._key, self._previous = (self._refs[:, :frame_size] if entropy else
                                     (np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=np.uint8)))
        self._space = _AddressSpace(arena_size(self._slots, frame_size, _RELEASE_CHUNK, PAGE))
        self._arena = self._space.array
        # byte runs this large are worth packing the residual if it saves min_entropy_saving bytes; the packed
        # format holds up to 3 channels and is read as little-endian words
        packs = entropy and layout[0] <= PACKED_CHANNELS and sys.byteorder == "little"
        entropy_from = max(2 * min_entropy_saving, 1) if packs else frame_size + 1
        for name, value in (("key_interval", key_interval), ("anchor_interval", anchor_interval),
                            ("entropy_from", entropy_from), ("min_saving", min_entropy_saving),
                            ("release_chunk", _RELEASE_CHUNK), *zip(_LAYOUT_FIELDS, layout.tolist())):
            self._state[name] = value  # fixed from here
        self.kernel_args = (self._block, self._arena, self._scratch.encoder)  # what append_frame takes for this store

    @property
    def nbytes(self) -> int:
        return self.content_nbytes + self._refs.nbytes + (self._scratch.nbytes if self._owns_scratch else 0)

    @property
    def decode_scratch_nbytes(self) -> int:
        """Bytes its scratch holds for decoding (work rows and residual planes per thread): not per frame."""
        return self._scratch.decode_nbytes

    @property
    def content_nbytes(self) -> int:
        """Bytes that grow with what is stored rather than with capacity: resident arena and index entries."""
        touched_slots = min(self.count, self._slots)
        index = touched_slots * sum(a.itemsize for a in (self._offsets, self._kinds, self._params, self._ref_dist))
        return self.arena_nbytes + index

    @property
    def arena_nbytes(self) -> int:
        """Resident bytes of the arena: the pages written since they were last handed back."""
        return resident_arena(self._state, self._arena.size, PAGE)

    @property
    def payload_bytes(self) -> int:
        """Bytes of the arena that hold stored frames (the rest is slack left by wrapping and pages)."""
        return int(arena_extent(self._block, self._arena)[3])

    @property
    def count(self) -> int:
        """Frames appended so far: the next frame's id."""
        return int(self._state["count"])

    @property
    def entropy_frames(self) -> int:
        """Frames held packed."""
        return int(self._state["entropy_frames"])

    def append(self, frame: np.ndarray, episode_start: bool) -> int:
        """Encode and store `frame` as the next frame id; that id."""
        frame = _as_row(frame, self.frame_size)
        return self.finish_append(frame, episode_start, append_frame(frame, episode_start, *self.kernel_args))

    def finish_append(self, frame: np.ndarray, episode_start: bool, outcome: int) -> int:
        """Finish storing `frame` (a row of frame_size uint8) after append_frame returned `outcome` for it, with
        nothing appended to a store of the same scratch since; its id."""
        if outcome == PAGES_BACK_FIRST:  # pages behind the tail go back before a payload can reach them
            self._free_pages(evicting=True)
            outcome = append_frame(frame, episode_start, *self.kernel_args)
            assert outcome != PAGES_BACK_FIRST, "the pages behind the tail were handed back"
        return int(outcome)

    def decode(self, ids: np.ndarray, out: np.ndarray) -> None:
        """Write the frames `ids` (M,) into `out` (M, C*H*W) uint8; ValueError for ids not held or a bad `out`.
        Safe from several threads (DiffScratch), and beside one appender for ids it has not evicted."""
        ids = check_decode(ids, out, max(self.count - self.capacity, int(self._state["first_needed"])), self.count,
                           self.frame_size)
        flat = out.reshape(-1)
        if self._state["entropy_frames"]:
            needs = needs_entropy(ids, self._block, self._arena)
            runs_only, entropy = np.flatnonzero(~needs), np.flatnonzero(needs)
            runs_order = runs_only[np.argsort(ids[runs_only])]
        else:
            runs_order, entropy = np.argsort(ids), ids[:0]
        if len(runs_order):
            decode_runs(ids, runs_order, self._block, self._arena, flat)
        if len(entropy):
            # contiguous stretches of the sorted ids, one per thread, each with its own references
            order = entropy[np.argsort(ids[entropy])]
            parts = np.array_split(order, min(self._scratch.decode_threads, len(order)))
            with self._scratch.decode_lock:
                if len(parts) == 1:
                    self._walk(ids, parts[0], flat, 0)
                else:
                    list(self._scratch.pool.map(self._walk, [ids] * len(parts), parts, [flat] * len(parts),
                                                range(len(parts))))

    def release(self, before: int) -> None:
        """Frames with id < `before` will not be decoded again: their payload's memory may go back."""
        self._state["first_needed"] = max(int(self._state["first_needed"]), min(before, self.count))
        self._free_pages(evicting=False)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain arrays (no pickled objects, the payload as views) that restore this store through load_state_dict."""
        first, tail, wrapped, live = (int(x) for x in arena_extent(self._block, self._arena))
        state = self._state
        count, head, wrap_end = int(state["count"]), int(state["head"]), int(state["wrap_end"])
        slots = np.arange(first, count) % self._slots
        offsets = self._offsets[slots]
        if wrapped:  # saved as one run of bytes starting at the tail: [tail, wrap_end) + [0, head)
            parts = (self._arena[tail:wrap_end], self._arena[:head])
            offsets = np.where(offsets >= tail, offsets - tail, offsets + wrap_end - tail)
        else:
            parts = (self._arena[tail:tail + live], self._arena[:0])
            offsets = offsets - tail
        return {"config": np.array(self._config(), dtype=np.int64),
                "counters": np.array([count, state["episode_pos"], first, state["first_needed"]], dtype=np.int64),
                "payload_start": parts[0], "payload_end": parts[1], "offsets": offsets, "kinds": self._kinds[slots],
                "params": self._params[slots], "ref_dist": self._ref_dist[slots],
                "key": self._key, "previous": self._previous}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what state_dict saved into a store of the same configuration; ValueError leaves it unchanged."""
        _check_config("full", state, self._config())
        check_saved_arrays(state, {"counters": ((4,), np.int64)})
        count, episode_pos, first, first_needed = (int(x) for x in state["counters"])
        held = count - first
        if not 0 <= held <= min(count, self._slots) or not 0 <= first_needed <= count:
            raise ValueError(f"saved counters {[count, episode_pos, first, first_needed]} are inconsistent")
        # packing continues from copies of the key and the last frame, which stores that do not pack do not keep
        reference = (self.frame_size,) if self.entropy else (None,)
        if self.entropy and any(np.asarray(state[name]).size == 0 for name in ("key", "previous")):
            raise ValueError("saved key and previous frame are empty (saved by a store with entropy=False)")
        check_saved_arrays(state, {"payload_start": ((None,), np.uint8), "payload_end": ((None,), np.uint8),
                                   "offsets": ((held,), np.int64), "kinds": ((held,), np.uint8),
                                   "params": ((held,), np.int32), "ref_dist": ((held,), np.int32),
                                   "key": (reference, np.uint8), "previous": (reference, np.uint8)})
        if not self.entropy and np.any(np.isin(state["kinds"], (PREV_PACKED, ANCHOR_PACKED, ALONE_PACKED))):
            raise ValueError("saved frames include packed ones; load them into a store with entropy=True")
        live = len(state["payload_start"]) + len(state["payload_end"])
        _check_index(state, self._config(), self._slots, frame_layout(self.frame_shape))
        self._space.release(0, self._space.size)
        start = len(state["payload_start"])
        self._arena[:start] = state["payload_start"]
        self._arena[start:live] = state["payload_end"]
        slots = np.arange(first, count) % self._slots
        self._kinds[:] = RAW  # slots of frames not saved hold nothing to count or decode
        for name in ("offsets", "kinds", "params", "ref_dist"):
            getattr(self, "_" + name)[slots] = state[name]
        if self.entropy:
            self._key[:], self._previous[:] = state["key"], state["previous"]
        for name, value in (("count", count), ("episode_pos", episode_pos), ("first_needed", first_needed),
                            ("head", live), ("wrap_end", 0), ("freed", 0),
                            ("entropy_frames", np.count_nonzero(self._kinds >= PREV_PACKED))):
            self._state[name] = value

    def __getstate__(self) -> dict:
        args = (self.capacity, self.frame_shape, self.key_interval, self.anchor_interval)
        kwargs = dict(entropy=self.entropy, min_entropy_saving=self.min_entropy_saving,
                      decode_threads=self.decode_threads)
        # a shared scratch goes along: pickle restores it shared by the stores pickled together
        return {"args": args, "kwargs": kwargs, "state": self.state_dict(),
                "scratch": None if self._owns_scratch else self._scratch}

    def __setstate__(self, pickled: dict) -> None:
        self.__init__(*pickled["args"], **pickled["kwargs"], scratch=pickled.get("scratch"))
        self.load_state_dict(pickled["state"])

    def _walk(self, ids: np.ndarray, order: np.ndarray, flat: np.ndarray, thread: int) -> None:
        """Decode ids[order] (sorted, some packed) into `flat` with decode thread `thread`'s rows."""
        work, planes = self._scratch.decoder_rows(thread)
        walk(ids, order, self._block, self._arena, Rows(flat, work, planes))

    def _config(self) -> list[int]:
        return [self.capacity, self.frame_size, self.key_interval, self.anchor_interval]

    def _free_pages(self, evicting: bool) -> None:
        """Hand back the dead pages behind the tail once they make a release chunk (kernels.py, section 4)."""
        start, length = pages_to_free(self._block, self._arena, int(evicting))
        if length:
            self._space.release(int(start), int(length))


def frame_layout(frame_shape: tuple[int, ...]) -> np.ndarray:
    """(channels, height, width, channel stride, pixel stride) of a frame: CHW or HWC for 3-d shapes with <= 4
    channels on one side, (H, W) for 2-d, otherwise one row of single-channel pixels."""
    if len(frame_shape) == 3 and frame_shape[0] <= 4 < frame_shape[2]:
        channels, height, width = frame_shape
        return np.array([channels, height, width, height * width, 1], dtype=np.int64)
    if len(frame_shape) == 3 and frame_shape[2] <= 4:
        height, width, channels = frame_shape
        return np.array([channels, height, width, 1, channels], dtype=np.int64)
    if len(frame_shape) == 2:
        return np.array([1, frame_shape[0], frame_shape[1], 0, 1], dtype=np.int64)
    return np.array([1, 1, math.prod(frame_shape), 0, 1], dtype=np.int64)


def _check_config(mode: str, state: dict[str, np.ndarray], config: list[int]) -> None:
    """Raise ValueError unless `state` was saved by a store of this mode and configuration."""
    saved = [int(x) for x in np.asarray(state.get("config", []))]
    if saved != config:
        raise ValueError(f"saved frame store has configuration {saved}, this {mode!r} store has {config} "
                         "(capacity, frame bytes[, key_interval, anchor_interval]); load it into a matching buffer")


_INDEX_PROBLEMS = {  # check_index's problems: the saved array at fault, and what is wrong with its entry
    kernels.BAD_KIND: ("kinds", "is not a kind its frame may have there"),
    kernels.BAD_REF_DIST: ("ref_dist", "is not the reference of a frame at its place, or its references are "
                           "not saved"),
    kernels.BAD_OFFSET: ("offsets", "is not where the previous frame's payload ends"),
    kernels.BAD_PAYLOAD: ("params", "with its kind, offset and run headers does not describe a payload inside "
                          "the frame and the saved payload"),
    kernels.BAD_COUNTERS: ("counters", "does not match the saved frames"),
}


def _check_index(state: dict[str, np.ndarray], config: list[int], slots: int, layout: np.ndarray) -> None:
    """Raise ValueError naming the first bad entry unless the saved index and payload of a `full` store (arrays of
    checked shapes and dtypes) describe frames as its encoder writes them (kernels.check_index)."""
    arrays = [np.ascontiguousarray(state[name]) for name in ("payload_start", "payload_end", "offsets", "kinds",
                                                              "params", "ref_dist", "counters")]
    problem, entry = check_index(*arrays, np.array(config, dtype=np.int64), slots, layout)
    if problem == kernels.BAD_TILING:
        raise ValueError("saved payload_start and payload_end do not hold exactly the saved frames' payloads: "
                         "the state is damaged or not from this code")
    if problem != kernels.INDEX_OK:
        name, what = _INDEX_PROBLEMS[problem]
        raise ValueError(f"saved {name}[{entry}] ({np.asarray(state[name])[entry]}) {what}: the state is damaged "
                         "or not from this code")


def check_decode(ids: np.ndarray, out: np.ndarray, first: int, count: int, frame_size: int) -> np.ndarray:
    """`ids` as int64 if they are integers in [first, count) and `out` a writable C-contiguous uint8 array of shape
    (len(ids), frame_size); else ValueError naming the first bad id or what is wrong with `out`."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.dtype.kind not in "iu" and ids.size):
        raise ValueError(f"ids must be a 1-d array of integers, got shape {ids.shape} and dtype {ids.dtype}")
    if type(out) is not np.ndarray or out.dtype != np.uint8 or out.shape != (len(ids), frame_size) \
            or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out must be a writable C-contiguous uint8 array of shape {(len(ids), frame_size)}, got "
                         f"{type(out).__name__} of shape {getattr(out, 'shape', None)} and dtype "
                         f"{getattr(out, 'dtype', None)}")
    if len(ids) and (ids.min() < first or ids.max() >= count):
        bad = int(np.flatnonzero((ids < first) | (ids >= count))[0])
        raise ValueError(f"ids[{bad}] = {ids[bad]} is not a frame the store holds: it holds ids {first} to {count - 1}"
                         " (older ones were evicted or released)")
    return np.ascontiguousarray(ids, dtype=np.int64)


def _as_row(frame: np.ndarray, frame_size: int) -> np.ndarray:
    """`frame` as a contiguous row of frame_size uint8, or ValueError."""
    if type(frame) is np.ndarray and frame.dtype is _UINT8 and frame.shape == (frame_size,) and frame.strides == (1,):
        return frame
    frame = np.ascontiguousarray(frame).reshape(-1)
    if frame.size != frame_size or frame.dtype != np.uint8:
        raise ValueError(f"frame has {frame.size} values of dtype {frame.dtype}; expected {frame_size} uint8")
    return frame


_NO_ROWS = np.empty((3, 0), dtype=np.uint8)  # append_frame's encoder rows for stores that encode nothing


def make_frame_store(compression: str, capacity: int, frame_shape: tuple[int, ...],
                     key_interval: int, anchor_interval: int, **full_options) -> FrameStore:
    """Build the frame store of a compression mode (COMPRESSIONS; `full_options` go to DiffFrames)."""
    if compression == "half":
        return RawFrames(capacity, frame_shape)
    if compression == "full":
        return DiffFrames(capacity, frame_shape, key_interval, anchor_interval, **full_options)
    raise ValueError(f"unknown compression {compression!r}: expected one of {COMPRESSIONS}")
