"""Which LoRA adapter each device slot holds (docs/engine.md, Batched LoRA): pure Python, used by the
scheduler.

The runner has ``max_loras`` slots of adapter weights on the device. A request with an adapter holds
a slot from its first admission to its end (also while preempted), so the requests admitted at any
time use at most ``max_loras`` distinct adapters and every step's batch fits the slots. A slot whose
last user ended keeps its adapter (a later request for it needs no copy) until a request for
another adapter needs the room: empty slots go first, then the least recently used idle one.
"""

from __future__ import annotations

from collections import OrderedDict


class LoraSlotTable:
    """Slots → adapter ids and their users; adapters are named by their unique load id."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.holder: list[int | None] = [None] * num_slots
        """The adapter id each slot holds (None: empty)."""
        self.users = [0] * num_slots
        """Admitted requests using each slot."""
        self._slot_of: dict[int, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict((s, None) for s in range(num_slots))
        """Slots nobody uses, least recently used first."""

    def can_take(self, adapter_id: int) -> bool:
        """True when a request for ``adapter_id`` can get a slot now (its adapter's, or an idle one)."""
        return adapter_id in self._slot_of or bool(self._idle)

    def take(self, adapter_id: int) -> tuple[int, bool]:
        """A slot for one more user of ``adapter_id`` and whether the adapter must be copied into it
        (call :meth:`can_take` first)."""
        slot = self._slot_of.get(adapter_id)
        load = slot is None
        if load:
            if not self._idle:
                raise RuntimeError("no LoRA slot is free")
            slot = next((s for s in self._idle if self.holder[s] is None), next(iter(self._idle)))
            old = self.holder[slot]
            if old is not None:
                del self._slot_of[old]
            self.holder[slot] = adapter_id
            self._slot_of[adapter_id] = slot
        self._idle.pop(slot, None)
        self.users[slot] += 1
        return slot, load

    def release(self, slot: int) -> None:
        """One user of ``slot`` ended; with none left the slot turns idle (most recently used)."""
        self.users[slot] -= 1
        if self.users[slot] == 0:
            self._idle[slot] = None

    @property
    def in_use(self) -> int:
        """Slots with at least one user."""
        return self.num_slots - len(self._idle)
