"""The leader's view of adapters: which are loaded (and their prefix-cache ids), and which device slot each
running adapter holds. Pure bookkeeping, no tensors: the scheduler asks it before admitting a request.

A replica runs at most ``max_loras`` adapters at once. An adapter takes a slot when its first request is
admitted and keeps it while any of its requests runs; a slot nobody uses goes to the next adapter that needs
one (an empty slot first, then the one idle longest; a slot that already holds the adapter is taken back
without a copy). A request whose adapter finds no slot waits in the queue; none fails.
"""

from __future__ import annotations


class AdapterSlots:
    def __init__(self, max_loras: int):
        self.max_loras = max_loras
        self.ids: dict[str, int] = {}                      # loaded adapter -> lora_id (its prefix-cache space)
        self.names: list[str] = [""] * max_loras           # what each slot holds ("" = nothing)
        self.users: list[int] = [0] * max_loras            # running sequences using each slot
        self._idle_since: list[int] = [0] * max_loras
        self._clock = 0

    # ------------------------------------------------------------------------------------------ registry
    def register(self, name: str, lora_id: int) -> None:
        self.ids[name] = lora_id

    def unregister(self, name: str) -> None:
        self.ids.pop(name, None)
        for s, held in enumerate(self.names):
            if held == name and self.users[s] == 0:
                self.names[s] = ""

    def cache_id(self, name: str | None) -> int:
        """The prefix-cache space of ``name``'s requests (0: the base model)."""
        return 0 if name is None else self.ids[name]

    # ------------------------------------------------------------------------------------------ slots
    def slot_of(self, name: str) -> int:
        for s, held in enumerate(self.names):
            if held == name:
                return s
        return -1

    def can_take(self, name: str) -> bool:
        """Whether a request of ``name`` could run now (its adapter holds a slot, or one is free)."""
        return self.slot_of(name) >= 0 or any(u == 0 for u in self.users)

    def acquire(self, name: str) -> int:
        """A slot for one more running request of ``name`` (the caller checked ``can_take``)."""
        s = self.slot_of(name)
        if s < 0:
            free = [i for i, u in enumerate(self.users) if u == 0]
            if not free:
                raise RuntimeError(f"no LoRA slot free for {name!r}")
            s = min(free, key=lambda i: (self.names[i] != "", self._idle_since[i]))
            self.names[s] = name
        self.users[s] += 1
        return s

    def release(self, slot: int) -> None:
        if slot < 0:
            return
        self.users[slot] -= 1
        assert self.users[slot] >= 0, "LoRA slot released more often than acquired"
        if self.users[slot] == 0:
            self._clock += 1
            self._idle_since[slot] = self._clock
            if self.names[slot] not in self.ids:  # unloaded while running: forget it now
                self.names[slot] = ""

    def slot_map(self) -> list[str]:
        """The adapter every slot in use holds, by slot (for the step's plan)."""
        return [n if u > 0 else "" for n, u in zip(self.names, self.users)]

    def in_use(self, name: str) -> bool:
        s = self.slot_of(name)
        return s >= 0 and self.users[s] > 0
