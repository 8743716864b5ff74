"""AdapterManager: the registered adapters, the device slots, and the batch plan per forward."""

from __future__ import annotations

import collections
import threading
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from adaptfuse import ops
from adaptfuse.adapters import BASE_NAME, AdapterError, LoraAdapter, read_peft_adapter
from adaptfuse.layers import LoraLayer


class AdapterManager:
    """Returned by adaptfuse.patch(model). Registered adapters live in host memory; up to
    max_loras of them sit in device slots, brought in on demand (least recently used out)."""

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, LoraLayer],
        max_loras: int,
        max_rank: int,
        memory_bytes: int,
    ):
        self.model = model
        self.layers = layers
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.memory_bytes = memory_bytes
        self._registry: dict[str, LoraAdapter] = {}
        self._slot_of: collections.OrderedDict[str, int] = collections.OrderedDict()  # LRU order
        self._lock = threading.Lock()
        first = next(iter(layers.values()))
        self._dtype = first.lora_A.dtype

    @property
    def adapters(self) -> list[str]:
        """Names of all registered adapters."""
        return list(self._registry)

    @property
    def device(self) -> torch.device:
        return next(iter(self.layers.values())).lora_A.device

    def load_adapter(self, path: str, adapter_name: Optional[str] = None) -> str:
        """Registers a PEFT LoRA folder under adapter_name (default: the folder's name).
        Everything is read and validated before anything changes."""
        name = adapter_name if adapter_name is not None else path.rstrip("/").split("/")[-1]
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter_name must be a non-empty string, got {name!r}")
        if name == BASE_NAME:
            raise ValueError(
                f"{BASE_NAME!r} is reserved for 'no adapter'; choose another adapter_name"
            )
        if name in self._registry:
            raise ValueError(
                f"an adapter named {name!r} is already loaded (from {self._registry[name].path}); "
                "unload it first or choose another name"
            )
        shapes = {
            path_: (layer.in_features, layer.out_features) for path_, layer in self.layers.items()
        }
        adapter = read_peft_adapter(path, name, shapes, self.max_rank, self._dtype)
        with self._lock:
            if name in self._registry:
                raise ValueError(f"an adapter named {name!r} is already loaded")
            self._registry[name] = adapter
            if len(self._slot_of) < self.max_loras:
                self._place(name, self._free_slot())
        return name

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if name not in self._registry:
                raise KeyError(f"no adapter named {name!r} is loaded; loaded: {self.adapters}")
            slot = self._slot_of.pop(name, None)
            if slot is not None:
                for layer in self.layers.values():
                    layer.write_slot(slot, None, None, 0.0)
            del self._registry[name]

    def _free_slot(self) -> int:
        used = set(self._slot_of.values())
        return next(s for s in range(self.max_loras) if s not in used)

    def _place(self, name: str, slot: int) -> None:
        adapter = self._registry[name]
        for path, layer in self.layers.items():
            weights = adapter.layers.get(path)
            if weights is None:
                layer.write_slot(slot, None, None, 0.0)
            else:
                layer.write_slot(slot, weights.A, weights.B, weights.scale)
        self._slot_of[name] = slot

    def slots_for(self, adapter_names: Sequence[Optional[str]]) -> list[int]:
        """Slot id per sequence (-1: base model), bringing adapters into slots as needed."""
        names = [None if n in (None, BASE_NAME) else n for n in adapter_names]
        for n in names:
            if n is not None and not isinstance(n, str):
                raise TypeError(f"adapter_names entries must be str or None, got {n!r}")
        wanted = [n for n in dict.fromkeys(names) if n is not None]
        unknown = [n for n in wanted if n not in self._registry]
        if unknown:
            raise KeyError(f"unknown adapter name(s) {unknown}; loaded: {self.adapters}")
        if len(wanted) > self.max_loras:
            raise ValueError(
                f"the batch names {len(wanted)} distinct adapters but patch() allocated "
                f"max_loras={self.max_loras} slots"
            )
        with self._lock:
            for n in wanted:
                if n in self._slot_of:
                    self._slot_of.move_to_end(n)
                    continue
                if len(self._slot_of) < self.max_loras:
                    slot = self._free_slot()
                else:
                    victim = next(v for v in self._slot_of if v not in wanted)
                    slot = self._slot_of.pop(victim)
                self._place(n, slot)
            return [-1 if n is None else self._slot_of[n] for n in names]

    def plan_for(
        self, adapter_names: Sequence[Optional[str]], batch: int, sequence: int
    ) -> ops.Plan:
        if not isinstance(adapter_names, (list, tuple)):
            raise TypeError(
                "adapter_names must be a list with one entry per sequence, "
                f"got {type(adapter_names).__name__}"
            )
        if len(adapter_names) != batch:
            raise ValueError(
                f"adapter_names has {len(adapter_names)} entries "
                f"but the batch has {batch} sequences"
            )
        slots = torch.tensor(self.slots_for(adapter_names), dtype=torch.int32)
        token_slots = slots.repeat_interleave(sequence).to(self.device, non_blocking=True)
        return ops.plan(token_slots, self.max_loras)

    def named_layers(self) -> Iterable[tuple[str, LoraLayer]]:
        return self.layers.items()


__all__ = ["AdapterError", "AdapterManager"]
