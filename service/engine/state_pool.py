"""Session states in one preallocated array per model version, one slot per session."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

from service.engine.errors import SessionLimitReached

FloatArray = npt.NDArray[np.float32]
SlotArray = npt.NDArray[np.intp]


class SlotPool(Protocol):
    """What sessions, the data plane and the batcher need of a state pool, host or device.

    Implemented by ``StatePool`` (numpy, on the host) and ``service.engine.device_pool.DevicePool``
    (OrtValues on the model's device). ``gather`` and ``scatter`` copy to and from the host.
    """

    @property
    def max_slots(self) -> int: ...

    @property
    def in_use(self) -> int: ...

    @property
    def capacity(self) -> int: ...

    @property
    def nbytes(self) -> int: ...

    def acquire(self) -> int: ...

    def release(self, slot: int) -> None: ...

    def reset(self, slot: int) -> None: ...

    def gather(self, slots: SlotArray) -> FloatArray: ...

    def scatter(self, slots: SlotArray, states: FloatArray) -> None: ...


class SlotAllocator:
    """Which slots of a pool are taken: released slots are reused first (LIFO keeps the pool
    compact), then never-used ones in order, up to ``max_slots``."""

    def __init__(self, max_slots: int) -> None:
        self.max_slots = max_slots
        self.in_use = 0
        self.handed_out = 0  # slots at and above this index were never handed out
        self._free: list[int] = []

    def take(self) -> int:
        """A free slot; raise ``SessionLimitReached`` when ``max_slots`` are in use."""
        if self._free:
            slot = self._free.pop()
        elif self.handed_out < self.max_slots:
            slot = self.handed_out
            self.handed_out += 1
        else:
            raise SessionLimitReached(self.max_slots)
        self.in_use += 1
        return slot

    def give_back(self, slot: int) -> None:
        self._free.append(slot)
        self.in_use -= 1


class SlotBookkeeping:
    """What both pools report of their ``SlotAllocator``."""

    _slots: SlotAllocator

    @property
    def max_slots(self) -> int:
        return self._slots.max_slots

    @property
    def in_use(self) -> int:
        return self._slots.in_use


class StatePool(SlotBookkeeping):
    """States of all sessions of one model version: an array (S, L, capacity, m) of float32.

    S is the number of state tensors (2 for an LSTM), L the layers, m the hidden size. A session
    owns one slot; a freed slot is zeroed and reused. Capacity doubles when full, up to
    ``max_slots``; fresh pages come from ``np.zeros`` and cost no resident memory until written.
    The pool is used from the event loop thread only, so it needs no lock. The device-resident
    version is ``service.engine.device_pool.DevicePool``.
    """

    def __init__(
        self,
        num_states: int,
        num_layers: int,
        hidden_size: int,
        max_slots: int,
        initial_capacity: int = 1024,
    ) -> None:
        capacity = min(initial_capacity, max_slots)
        self._states: FloatArray = np.zeros(
            (num_states, num_layers, capacity, hidden_size), dtype=np.float32
        )
        self._slots = SlotAllocator(max_slots)

    @property
    def capacity(self) -> int:
        return int(self._states.shape[2])

    @property
    def nbytes(self) -> int:
        return int(self._states.nbytes)

    def acquire(self) -> int:
        """Hand out a zeroed slot; raise ``SessionLimitReached`` when ``max_slots`` are in use."""
        slot = self._slots.take()
        if slot == self.capacity:
            self._grow()
        return slot

    def release(self, slot: int) -> None:
        """Zero a slot and return it to the free list."""
        self.reset(slot)
        self._slots.give_back(slot)

    def reset(self, slot: int) -> None:
        self._states[:, :, slot, :] = 0.0

    def gather(self, slots: SlotArray) -> FloatArray:
        """Copy the states of ``slots`` (B,) into a new array (S, L, B, m)."""
        return self._states[:, :, slots, :]  # fancy indexing copies

    def scatter(self, slots: SlotArray, states: FloatArray) -> None:
        """Write ``states`` (S, L, B, m) into ``slots`` (B,), which must be distinct."""
        self._states[:, :, slots, :] = states

    def _grow(self) -> None:
        new_capacity = min(self.capacity * 2, self.max_slots)
        shape = (*self._states.shape[:2], new_capacity, self._states.shape[3])
        grown = np.zeros(shape, dtype=np.float32)
        grown[:, :, : self.capacity, :] = self._states
        self._states = grown
