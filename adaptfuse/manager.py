"""AdapterManager: the registered adapters, the device slots, and the batch plan per forward."""

from __future__ import annotations

import collections
import threading
from typing import Optional, Sequence

import torch
from torch import nn

from adaptfuse import ops
from adaptfuse.adapters import BASE_NAME, AdapterError, LoraAdapter, read_peft_adapter
from adaptfuse.layers import BatchPlans, LoraLayer


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
        # Forwards in flight pin the adapters they use: a pinned adapter keeps its slot (no
        # eviction, no unload) until every forward using it has returned.
        self._pins: collections.Counter[str] = collections.Counter()
        self._changed = threading.Condition(threading.Lock())
        # The merge in effect: {name: weight} and, per merged layer, what unmerge needs.
        self.merged: Optional[dict[str, float]] = None
        self._merge_records: list[tuple[str, list, list, list, ops.MergeRecord]] = []

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
        first = next(iter(self.layers.values())).lora_A
        adapter = read_peft_adapter(path, name, shapes, self.max_rank, first.dtype)
        if first.device.type == "cuda":  # pinned host copies: slot writes are real async copies
            for weights in adapter.layers.values():
                weights.A, weights.B = weights.A.pin_memory(), weights.B.pin_memory()
        with self._changed:
            if name in self._registry:
                raise ValueError(f"an adapter named {name!r} is already loaded")
            self._registry[name] = adapter
            if len(self._slot_of) < self.max_loras:
                self._place(name, self._free_slot())
        return name

    def unload_adapter(self, name: str) -> None:
        """Removes an adapter; waits for forwards in flight that use it."""
        with self._changed:
            if name not in self._registry:
                raise KeyError(f"no adapter named {name!r} is loaded; loaded: {self.adapters}")
            if self.merged is not None and name in self.merged:
                raise ValueError(f"{name!r} is merged into the base weights; call unmerge() first")
            self._changed.wait_for(lambda: self._pins[name] == 0)
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

    def acquire(self, adapter_names: Sequence[Optional[str]]) -> tuple[list[int], list[str]]:
        """Slot id per sequence (-1: base model), bringing adapters into slots as needed, and
        pinning them until release(). When every slot is pinned by other forwards, waits."""
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
        with self._changed:
            # All or nothing: wait until every missing adapter can have a slot (free, or held
            # by an adapter no forward in flight uses), so that forwards never deadlock.
            def missing():
                return [n for n in wanted if n not in self._slot_of]

            def evictable():
                merged = self.merged or {}
                return [
                    v
                    for v in self._slot_of
                    if v not in wanted and v not in merged and self._pins[v] == 0
                ]

            def placeable():
                gone = [n for n in wanted if n not in self._registry]
                if gone:
                    raise KeyError(f"adapter(s) {gone} were unloaded; loaded: {self.adapters}")
                free = self.max_loras - len(self._slot_of)
                return len(missing()) <= free + len(evictable())

            self._changed.wait_for(placeable)
            for n in missing():
                if len(self._slot_of) < self.max_loras:
                    self._place(n, self._free_slot())
                else:
                    self._place(n, self._slot_of.pop(evictable()[0]))  # least recently used
            for n in wanted:
                self._slot_of.move_to_end(n)
                self._pins[n] += 1
            return [-1 if n is None else self._slot_of[n] for n in names], wanted

    def release(self, pinned: Sequence[str]) -> None:
        with self._changed:
            for n in pinned:
                self._pins[n] -= 1
            self._changed.notify_all()

    def plan_for(
        self, adapter_names: Sequence[Optional[str]], batch: int, sequence: int
    ) -> tuple[BatchPlans, list[str]]:
        """The forward's plans and the adapters it pinned (pass them to release())."""
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
        slot_ids, pinned = self.acquire(adapter_names)
        try:
            token_slots = torch.tensor(slot_ids, dtype=torch.int32).repeat_interleave(sequence)
            return BatchPlans(
                token_slots.to(self.device, non_blocking=True), self.max_loras
            ), pinned
        except BaseException:
            self.release(pinned)
            raise

    def merge(self, spec) -> None:
        """Folds one adapter (a name) or a weighted sum of adapters ({name: weight}) into the
        base weights of every adapted layer. Refused while a merge is in effect. A merge that
        fails midway (a result that would not be finite...) restores every layer it touched."""
        weights = {spec: 1.0} if isinstance(spec, str) else dict(spec)
        if self.merged is not None:
            current = ", ".join(repr(n) for n in self.merged)
            raise ValueError(f"{current} is merged; call unmerge() first")
        if not weights:
            raise ValueError("merge() needs an adapter name or a non-empty {name: weight} mapping")
        unknown = [n for n in weights if n not in self._registry]
        if unknown:
            raise KeyError(f"unknown adapter name(s) {unknown}; loaded: {self.adapters}")
        from tqdm.auto import tqdm

        records = []
        layers = list(self.layers.items())
        try:
            for path, layer in tqdm(layers, desc="merging", disable=len(layers) < 64, leave=False):
                terms = [
                    (self._registry[n].layers[path], float(w))
                    for n, w in weights.items()
                    if path in self._registry[n].layers
                ]
                if not terms:
                    continue
                device = layer.lora_A.device
                A = [t.A.to(device) for t, _ in terms]
                B = [t.B.to(device) for t, _ in terms]
                coefficients = [w * t.scale for t, w in terms]
                record = ops.merge_(layer.weight_out_in(), A, B, coefficients)
                records.append((path, A, B, coefficients, record))
        except BaseException:
            self._unmerge_layers(records)
            raise
        self._merge_records = records
        self.merged = weights

    def unmerge(self) -> None:
        """Restores every merged base weight bit for bit."""
        if self.merged is None:
            raise ValueError("no adapter is merged")
        self._unmerge_layers(self._merge_records)
        self._merge_records = []
        self.merged = None

    def _unmerge_layers(self, records) -> None:
        for path, A, B, coefficients, record in reversed(records):
            ops.unmerge_(self.layers[path].weight_out_in(), A, B, coefficients, record)

    def check_merged_names(self, names: Sequence[Optional[str]]) -> None:
        """While merged, a batch may only name the single merged adapter (in every row)."""
        merged = list(self.merged)
        if len(merged) == 1 and all(n == merged[0] for n in names):
            return
        raise ValueError(
            f"{', '.join(repr(n) for n in merged)} is merged into the base weights: a batch may "
            f"only name {merged[0]!r} in every row"
            if len(merged) == 1
            else f"a weighted merge of {merged} is in effect: batches may not name adapters"
        )


__all__ = ["AdapterError", "AdapterManager"]
