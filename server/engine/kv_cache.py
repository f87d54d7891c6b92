"""KV slot allocator: which sequence owns which row of the runner's preallocated cache.

Layout invariant (kept after every call):

    slots 0 .. d-1   decoding sequences (the decode batch is exactly these, see interface.py)
    slots d .. m-1   sequences whose prompt is still being prefilled, in admission order
    slots m ..       free; `num_reserved` of them are promised to choices 1..n-1 of a request
                     whose prompt is still prefilling (they get the prompt by copy_slot)

NOTE: a hole left by a finished sequence is filled by moving another one into it with a slot
copy (only its cached positions), never by gathering slots per step: a gather copies the whole
cache every step (docs/benchmarks.md, "Design measurements"). The manager only records the
copies (`take_copies`); the scheduler puts them at the head of the next step's plan and the
runner runs them, in order, before any graph of that step.
A sequence mid chunked-prefill is moved down too, so it always sits right after the decoders.
The runner's decode must therefore not write K/V into slots >= n (the decode batch) at
positions a prefilling sequence uses; padding rows may use position max_model_len - 1,
which no sequence ever reads.
"""
from __future__ import annotations

from typing import Iterable, Optional

from server.engine.request import Sequence
from server.engine.types import SlotCopy


class KVCacheManager:
    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._pending_copies: list[SlotCopy] = []
        self._owners: list[Optional[Sequence]] = [None] * num_slots
        self.num_decoding = 0
        self.num_used = 0
        self.num_reserved = 0

    @property
    def num_free(self) -> int:
        return self.num_slots - self.num_used - self.num_reserved

    def can_allocate(self, num_seqs: int) -> bool:
        return num_seqs <= self.num_free

    def decoding(self) -> list[Sequence]:
        """The decode batch: slot i holds element i."""
        return list(self._owners[:self.num_decoding])

    def owner(self, slot: int) -> Optional[Sequence]:
        return self._owners[slot]

    def allocate(self, seq: Sequence, num_reserved: int = 0) -> int:
        """Give `seq` (about to prefill) the first free slot and reserve `num_reserved` more."""
        if not self.can_allocate(1 + num_reserved):
            raise RuntimeError(f"no free KV slot for {seq}")
        slot = self.num_used
        self._owners[slot] = seq
        seq.slot = slot
        self.num_used += 1
        self.num_reserved += num_reserved
        return slot

    def release_reserved(self, num: int) -> None:
        if num > self.num_reserved:
            raise RuntimeError(f"releasing {num} reserved slots, only {self.num_reserved} held")
        self.num_reserved -= num

    def promote(self, seq: Sequence, children: Iterable[Sequence] = ()) -> None:
        """`seq` finished prefilling and starts decoding; `children` (its request's other
        choices, reserved at allocation) take the next slots. The prompt's cache reaches them
        by the copies of the prefill chunk that completes it (PrefillChunk.fork_slots)."""
        if seq.slot != self.num_decoding:
            raise RuntimeError(f"{seq} finished prefill but is not next to the decoders "
                               f"(slot {seq.slot}, {self.num_decoding} decoding)")
        self.num_decoding += 1
        for child in children:
            if self.num_used != self.num_decoding or self.num_reserved == 0:
                raise RuntimeError(f"no reserved slot next to the decoders for {child}")
            self._owners[self.num_used] = child
            child.slot = self.num_used
            self.num_used += 1
            self.num_decoding += 1
            self.num_reserved -= 1

    def free(self, seqs: Iterable[Sequence]) -> None:
        """Release the slots of `seqs` and compact the rest back into the layout invariant."""
        old_d = self.num_decoding
        for seq in seqs:
            if seq.slot is None:
                continue
            if self._owners[seq.slot] is not seq:
                raise RuntimeError(f"{seq} does not own slot {seq.slot}")
            self._owners[seq.slot] = None
            if seq.slot < old_d:
                self.num_decoding -= 1
            seq.slot = None
            self.num_used -= 1
        d = self.num_decoding
        # Decoders left in [d, old_d) fill the holes below d; then the prefilling sequences
        # (at old_d and above) slide down behind them, keeping their order.
        holes = [i for i in range(d) if self._owners[i] is None]
        movers = [s for s in self._owners[d:old_d] if s is not None]
        for hole, seq in zip(holes, movers):
            self._move(seq, hole)
        prefilling = [s for s in self._owners[old_d:] if s is not None]
        for target, seq in enumerate(prefilling, start=d):
            if seq.slot != target:
                self._move(seq, target)

    def _move(self, seq: Sequence, dst: int) -> None:
        src = seq.slot
        if seq.num_computed_tokens > 0:
            self._pending_copies.append(SlotCopy(src, dst, seq.num_computed_tokens))
        self._owners[dst] = seq
        self._owners[src] = None
        seq.slot = dst

    def record_copy(self, copy: SlotCopy) -> None:
        """A copy that must run before the compaction copies recorded after it (a prefix-cache store
        of a finishing sequence's slot, before another sequence moves into that slot)."""
        self._pending_copies.append(copy)

    def take_copies(self) -> list[SlotCopy]:
        """The compaction copies recorded since the last call, in the order they must run."""
        copies, self._pending_copies = self._pending_copies, []
        return copies

    def check(self) -> None:
        """Assert the layout invariant (tests and debugging)."""
        used = [i for i, s in enumerate(self._owners) if s is not None]
        assert used == list(range(self.num_used)), f"slots not packed: {self._owners}"
        assert all(s.slot == i for i, s in enumerate(self._owners) if s is not None)
        assert self.num_used + self.num_reserved <= self.num_slots
        assert 0 <= self.num_decoding <= self.num_used
