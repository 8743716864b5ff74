"""AdapterManager: the registered adapters, the device slots, and the batch plan per forward."""

from __future__ import annotations

import collections
import contextlib
import threading
from typing import Optional, Sequence

import torch
from torch import nn

from adaptfuse.adapters import (
    BASE_NAME,
    KEY_PREFIX,
    AdapterError,
    BottleneckAdapter,
    BottleneckWeights,
    LoraAdapter,
    LoraWeights,
    is_adapterhub_folder,
    lora_scale,
    merge_terms,
    pattern_value,
    read_adapterhub_adapter,
    read_adapterhub_options,
    read_peft_adapter,
)
from adaptfuse.layers import BatchPlans, BottleneckLayer, LoraLayer
from adaptfuse.merge import LayerMerge, MergeOptions, merge_layer, unmerge_layer
from adaptfuse.training import (
    PRESET_POINTS,
    TrainableAdapter,
    TrainableBottleneck,
    TrainableLayer,
    adapterhub_key,
    bottleneck_options,
    init_bottleneck,
    read_training_options,
    save_adapterhub_folder,
    save_peft_folder,
    select_layers,
)


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
        # Pins held by static assignments (CUDA-graph steps) rather than by forwards in flight:
        # they last until the assignment changes, so unload refuses instead of waiting.
        self._static_pins: collections.Counter[str] = collections.Counter()
        self._changed = threading.Condition(threading.Lock())
        # Forwards read the base weights that merge/unmerge rewrite: a merge waits for the
        # forwards in flight and holds new ones back until it is done (readers and a writer).
        self._forwards_in_flight = 0
        self._rewriting_weights = False
        # The merge in effect: {name: weight} and, per merged layer, what unmerge needs.
        self.merged: Optional[dict[str, float]] = None
        self._trainable: dict[str, TrainableAdapter] = {}
        # Layers patch left alone, with the reason (an unsupported tensor-parallel plan...):
        # an adapter that targets one is refused with that reason.
        self.unsupported_layers: dict[str, str] = {}
        self._merge_records: list[LayerMerge] = []
        self._merge_options = MergeOptions()
        # Bottleneck slot banks (patch's max_bottleneck_dim > 0): (block index, point) -> layer,
        # on the same slots as the LoRA layers; blocks_path names the decoder blocks.
        self.bottleneck_layers: dict[tuple[int, str], BottleneckLayer] = {}
        self.blocks_path = ""
        self.max_bottleneck_dim = 0

    @property
    def adapters(self) -> list[str]:
        """Names of all registered adapters."""
        return list(self._registry)

    @property
    def device(self) -> torch.device:
        """The device of the slot banks (the first adapted layer's)."""
        return next(iter(self.layers.values())).lora_A.device

    def _check_new_name(self, name) -> None:
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

    def load_adapter(
        self, path: str, adapter_name: Optional[str] = None, trainable: bool = False
    ) -> str:
        """Registers an adapter folder under adapter_name (default: the folder's name): a PEFT
        LoRA folder, or an AdapterHub bottleneck folder (recognised by its files). Everything is
        read and validated before anything changes. trainable=True resumes training it (fp32
        parameters, see add_adapter and add_bottleneck_adapter)."""
        name = adapter_name if adapter_name is not None else path.rstrip("/").split("/")[-1]
        self._check_new_name(name)
        first = next(iter(self.layers.values())).lora_A
        if is_adapterhub_folder(path):
            if trainable:
                self._check_bottleneck_name(name)
                adapter = self._read_bottleneck(path, name, torch.float32)
                options = read_adapterhub_options(path)
                # The options as the reader validated them (scaling may be absent: 1.0).
                options.update(non_linearity=adapter.activation, scaling=adapter.scaling)
                weights = {
                    key: (w.down, w.down_bias, w.up.t(), w.up_bias)
                    for key, w in adapter.points.items()
                }
                self._add_trainable_bottleneck(name, path, options, weights)
                return name
            adapter = self._read_bottleneck(path, name, first.dtype)
        elif trainable:
            adapter = self._read_adapter(path, name, torch.float32)
            options = read_training_options(path)
            weights = {p: (w.A, w.B, w.scale) for p, w in adapter.layers.items()}
            self._add_trainable(name, path, weights, **options)
            return name
        else:
            adapter = self._read_adapter(path, name, first.dtype)
        if first.device.type == "cuda":  # pinned host copies: slot writes are real async copies
            if isinstance(adapter, BottleneckAdapter):
                for weights in adapter.points.values():
                    weights.down, weights.up = weights.down.pin_memory(), weights.up.pin_memory()
            else:
                for weights in adapter.layers.values():
                    weights.A, weights.B = weights.A.pin_memory(), weights.B.pin_memory()
        with self._changed:
            if name in self._registry:
                raise ValueError(f"an adapter named {name!r} is already loaded")
            self._registry[name] = adapter
            if len(self._slot_of) < self.max_loras:
                self._place(name, self._free_slot())
        return name

    def _read_adapter(self, path: str, name: str, dtype: torch.dtype, slices=None) -> LoraAdapter:
        """Reads and validates a PEFT folder for the patched layers; slices: module path ->
        (columns of lora_A, rows of lora_B) to read, for the layers held in part."""
        shapes = {path_: layer.full_features for path_, layer in self.layers.items()}
        return read_peft_adapter(
            path, name, shapes, self.max_rank, dtype, slices, self.unsupported_layers
        )

    def _read_bottleneck(self, path: str, name: str, dtype: torch.dtype) -> BottleneckAdapter:
        if not self.bottleneck_layers:
            raise AdapterError(
                f"{path}: an AdapterHub bottleneck adapter, but patch() allocated no bottleneck "
                "slots; pass max_bottleneck_dim (e.g. 64) to adaptfuse.patch"
            )
        points = {
            key: (layer.hidden, self.max_bottleneck_dim)
            for key, layer in self.bottleneck_layers.items()
        }
        return read_adapterhub_adapter(path, name, self.blocks_path, points, dtype)

    def _clear_slot(self, slot: int) -> None:
        """Empties a slot in every layer of both kinds."""
        for layer in self.layers.values():
            layer.write_slot(slot, None, None, 0.0)
        for bottleneck in self.bottleneck_layers.values():
            bottleneck.write_slot(slot, None)

    def unload_adapter(self, name: str) -> None:
        """Removes an adapter; waits for forwards in flight that use it."""
        with self._changed:
            if name not in self._registry:
                raise KeyError(f"no adapter named {name!r} is loaded; loaded: {self.adapters}")
            if self.merged is not None and name in self.merged:
                raise ValueError(f"{name!r} is merged into the base weights; call unmerge() first")
            self._refuse_trainable(name, "unload")
            if self._static_pins[name]:
                raise ValueError(
                    f"{name!r} is assigned to a static assignment (a CUDA-graph step); "
                    "assign() it other adapters or close() it first"
                )
            self._changed.wait_for(lambda: self._pins[name] == 0)
            slot = self._slot_of.pop(name, None)
            if slot is not None:
                self._clear_slot(slot)
            del self._registry[name]

    def _free_slot(self) -> int:
        used = set(self._slot_of.values())
        return next(s for s in range(self.max_loras) if s not in used)

    def _place(self, name: str, slot: int) -> None:
        adapter = self._registry[name]
        if isinstance(adapter, BottleneckAdapter):
            for layer in self.layers.values():
                layer.write_slot(slot, None, None, 0.0)
            for key, bottleneck in self.bottleneck_layers.items():
                bottleneck.write_slot(
                    slot, adapter.points.get(key), adapter.activation, adapter.scaling
                )
            self._slot_of[name] = slot
            return
        for bottleneck in self.bottleneck_layers.values():
            bottleneck.write_slot(slot, None)
        for path, layer in self.layers.items():
            weights = adapter.layers.get(path)
            if weights is None:
                layer.write_slot(slot, None, None, 0.0)
            else:
                layer.write_slot(slot, weights.A, weights.B, weights.scale)
        self._slot_of[name] = slot

    def acquire(
        self,
        adapter_names: Sequence[Optional[str]],
        releasing: Sequence[str] = (),
        static: bool = False,
    ) -> tuple[list[int], list[str]]:
        """Slot id per sequence (-1: base model), bringing adapters into slots as needed, and
        pinning them until release(). When every slot is pinned by other forwards, waits.
        static: pins of a StaticAssignment, which replaces its previous ones (`releasing`) in
        the same step, so that its old adapters can make room for its new ones."""
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
                return self._evictable(wanted)

            def placeable():
                gone = [n for n in wanted if n not in self._registry]
                if gone:
                    raise KeyError(f"adapter(s) {gone} were unloaded; loaded: {self.adapters}")
                self._refuse_unplaceable(wanted)
                free = self.max_loras - len(self._slot_of)
                return len(missing()) <= free + len(evictable())

            self._pins.subtract(releasing)
            self._static_pins.subtract(releasing)
            try:
                self._changed.wait_for(placeable)
                for n in missing():
                    if len(self._slot_of) < self.max_loras:
                        self._place(n, self._free_slot())
                    else:
                        self._place(n, self._slot_of.pop(evictable()[0]))  # least recently used
            except BaseException:
                self._pins.update(releasing)
                self._static_pins.update(releasing)
                raise
            for n in wanted:
                self._slot_of.move_to_end(n)
                self._pins[n] += 1
                self._static_pins[n] += static
            self._changed.notify_all()
            return [-1 if n is None else self._slot_of[n] for n in names], wanted

    def _refuse_unplaceable(self, wanted) -> None:
        """Refuses a batch that could wait forever: slots held by trainable or merged adapters
        it does not name are not freed by forwards returning."""
        merged = self.merged or {}
        held = [
            v
            for v in self._slot_of
            if v not in wanted
            and (v in self._trainable or v in merged or self._static_pins[v] > 0)
        ]
        usable = self.max_loras - len(held)
        if len(wanted) > usable:
            raise ValueError(
                f"the batch names {len(wanted)} distinct adapters but only {usable} of the "
                f"max_loras={self.max_loras} slots can hold them: {held} keep theirs (trainable "
                "adapters until freeze(), a merged one until unmerge(), adapters of a static "
                "assignment until it assigns others)"
            )

    def _evictable(self, wanted) -> list[str]:
        """Adapters in slots that may lose theirs, least recently used first: not wanted by
        the batch, not merged, not trainable, and used by no forward in flight."""
        merged = self.merged or {}
        return [
            v
            for v in self._slot_of
            if v not in wanted
            and v not in merged
            and v not in self._trainable
            and self._pins[v] == 0
        ]

    def release(self, pinned: Sequence[str]) -> None:
        """Unpins the adapters acquire() pinned for one forward (their slots may be reused)."""
        with self._changed:
            for n in pinned:
                self._pins[n] -= 1
            self._changed.notify_all()

    def static_assignment(self, batch: int, sequence: int = 1) -> "StaticAssignment":
        """A fixed device buffer of token slot ids for a step captured into a CUDA graph:
        pass the returned object as adapter_names to the forward you capture, and call its
        assign(adapter_names) between replays to change each sequence's adapter."""
        return StaticAssignment(self, batch, sequence)

    def plan_for(
        self, adapter_names: Sequence[Optional[str]], batch: int, sequence: int
    ) -> tuple[BatchPlans, list[str]]:
        """The plans of one forward over input_ids [batch, sequence] (token t of sequence b is
        token b * sequence + t; its slot id repeats adapter_names[b]) and the adapters it
        pinned (pass them to release())."""
        if isinstance(adapter_names, StaticAssignment):
            return adapter_names.plans_for(self, batch, sequence), []
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

    # ---- training (DESIGN.md "Training many adapters at once") ----------------------------

    def _refuse_trainable(self, name: str, action: str) -> None:
        if name in self._trainable:
            raise ValueError(
                f"{name!r} is trainable: cannot {action} it; call freeze({name!r}) first"
            )

    def add_adapter(
        self,
        adapter_name: str,
        r: int = 8,
        lora_alpha: float = 8,
        use_rslora: bool = False,
        rank_pattern: Optional[dict] = None,
        alpha_pattern: Optional[dict] = None,
        lora_dropout: float = 0.0,
        target_modules=None,
        exclude_modules=None,
    ) -> str:
        """A new trainable adapter with PEFT's initialisation (A Kaiming-uniform, B zero) and
        PEFT's LoraConfig options. It holds a device slot until freeze(); its fp32 parameters
        are mgr.parameters(name) / mgr.named_parameters(name)."""
        self._check_new_name(adapter_name)
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        paths = select_layers(list(self.layers), target_modules, exclude_modules)
        weights = {}
        for path in paths:
            rank = int(pattern_value(rank_pattern, path, r))
            if not 1 <= rank <= self.max_rank:
                raise ValueError(
                    f"add_adapter({adapter_name!r}): layer {path} would have rank {rank}, "
                    f"outside 1..max_rank={self.max_rank} given to patch()"
                )
            alpha = float(pattern_value(alpha_pattern, path, lora_alpha))
            h_in, h_out = self.layers[path].full_features  # the whole layer's, even when sharded
            A = torch.empty(rank, h_in)
            nn.init.kaiming_uniform_(A, a=5**0.5)  # nn.Linear's default, as PEFT initialises
            B = torch.zeros(rank, h_out)
            weights[path] = (A, B, lora_scale(alpha, rank, use_rslora))
        self._add_trainable(
            adapter_name,
            "<trainable>",
            weights,
            r=r,
            lora_alpha=lora_alpha,
            use_rslora=use_rslora,
            lora_dropout=lora_dropout,
        )
        return adapter_name

    def _slot_for_trainable(self, name: str) -> int:
        """A slot for a new trainable adapter (free, or taken from the least recently used
        evictable adapter), emptied in the served banks of both kinds. Call under the lock."""
        self._check_new_name(name)
        if len(self._trainable) >= self.max_loras:
            raise ValueError(
                f"cannot add trainable adapter {name!r}: all max_loras={self.max_loras} "
                f"slots hold trainable adapters ({list(self._trainable)}); freeze one first"
            )
        if len(self._slot_of) < self.max_loras:
            slot = self._free_slot()
        else:
            evictable = self._evictable(wanted=())
            if not evictable:
                raise ValueError(
                    f"cannot add trainable adapter {name!r}: every slot is in use by a "
                    "forward in flight or a merged adapter"
                )
            slot = self._slot_of.pop(evictable[0])
        self._clear_slot(slot)
        return slot

    @contextlib.contextmanager
    def _detached_on_failure(self, slot: int):
        """A trainable adapter half attached to the layers (out of memory at a later layer...)
        is taken out of every layer again before the error propagates."""
        try:
            yield
        except BaseException:
            for layer in [*self.layers.values(), *self.bottleneck_layers.values()]:
                layer.detach_trainable(slot)
            raise

    def _add_trainable(self, name, path, weights, r, lora_alpha, use_rslora, lora_dropout):
        with self._changed:
            slot = self._slot_for_trainable(name)
            layers = {}
            with self._detached_on_failure(slot):
                for layer_path, layer in self.layers.items():
                    if layer_path not in weights:
                        continue
                    A, B, scale = weights[layer_path]
                    device = layer.lora_A.device
                    rank = A.shape[0]
                    alpha = scale * (rank**0.5 if use_rslora else rank)
                    A_param, B_param = layer.attach_trainable(
                        slot,
                        A.to(device, torch.float32),
                        B.to(device, torch.float32),
                        scale,
                        lora_dropout,
                    )
                    layers[layer_path] = TrainableLayer(A_param, B_param, alpha, scale)
            self._trainable[name] = TrainableAdapter(
                name, slot, r, lora_alpha, use_rslora, lora_dropout, layers
            )
            self._registry[name] = LoraAdapter(name=name, path=path, layers={})
            self._slot_of[name] = slot

    def add_bottleneck_adapter(
        self,
        adapter_name: str,
        config: str = "seq_bn",
        reduction_factor=None,
        non_linearity: Optional[str] = None,
        scaling: Optional[float] = None,
        init_weights: Optional[str] = None,
        leave_out: Sequence[int] = (),
    ) -> str:
        """A new trainable AdapterHub bottleneck adapter: config one of "seq_bn" (on each
        block's output), "double_seq_bn" (on the attention and the MLP outputs) or "par_bn"
        (parallel to the MLP), with AdapterHub's defaults for that config unless given; the
        bottleneck dim of a block is hidden // reduction_factor; init_weights "bert" (both
        weights N(0, 0.02)) or "mam_adapter" (the up-projection starts at zero); leave_out:
        block indices without an adapter. fp32 parameters with AdapterHub's key names
        (mgr.named_parameters); save_adapter writes AdapterHub's format."""
        options = bottleneck_options(
            config, reduction_factor, non_linearity, scaling, init_weights, leave_out
        )
        self._check_new_name(adapter_name)
        self._check_bottleneck_name(adapter_name)
        if not self.bottleneck_layers:
            raise ValueError(
                "patch() allocated no bottleneck slots; pass max_bottleneck_dim (e.g. 64) to "
                "adaptfuse.patch to add bottleneck adapters"
            )
        points = set(PRESET_POINTS[config].values())
        blocks = sorted({index for index, _ in self.bottleneck_layers})
        unknown = sorted(set(options["leave_out"]) - set(blocks))
        if unknown:
            raise ValueError(f"leave_out={unknown}: the model has blocks {blocks[0]}..{blocks[-1]}")
        missing = points - {point for _, point in self.bottleneck_layers}
        if missing:
            raise ValueError(
                f"add_bottleneck_adapter({adapter_name!r}): config={config!r} acts at "
                f"{sorted(points)}, but patch() allocated bottleneck slots only at "
                f"{sorted({p for _, p in self.bottleneck_layers})} (see bottleneck_points)"
            )
        if not set(blocks) - set(options["leave_out"]):
            raise ValueError(f"leave_out={options['leave_out']} leaves out every block")
        dims = {}
        for (index, point), layer in sorted(self.bottleneck_layers.items()):
            if point not in points or index in options["leave_out"]:
                continue
            dim = int(layer.hidden // options["reduction_factor"])
            if not 1 <= dim <= self.max_bottleneck_dim:
                raise ValueError(
                    f"add_bottleneck_adapter({adapter_name!r}): hidden size {layer.hidden} / "
                    f"reduction_factor={options['reduction_factor']} gives bottleneck dim {dim}, "
                    f"outside 1..max_bottleneck_dim={self.max_bottleneck_dim} given to patch()"
                )
            dims[(index, point)] = (dim, layer.hidden)
        # Drawn only once everything is validated (a refusal leaves the generator as it was).
        weights = {
            key: init_bottleneck(dim, hidden, options["init_weights"])
            for key, (dim, hidden) in dims.items()
        }
        self._add_trainable_bottleneck(adapter_name, "<trainable>", options, weights)
        return adapter_name

    @staticmethod
    def _check_bottleneck_name(name: str) -> None:
        # AdapterHub's keys hold the name between dots ("...adapters.<name>.adapter_up...").
        if "." in name:
            raise ValueError(
                f"bottleneck adapter name {name!r} contains '.', which AdapterHub's tensor keys "
                "cannot hold; choose another adapter_name"
            )

    def _add_trainable_bottleneck(self, name, path, options, weights) -> None:
        """weights: (block index, point) -> (down [m, H], down_bias [m], up [H, m], up_bias
        [H]) as AdapterHub stores them."""
        with self._changed:
            slot = self._slot_for_trainable(name)
            activation = options["non_linearity"].lower()
            scaling = float(options["scaling"])
            points = {}
            with self._detached_on_failure(slot):
                for key, tensors in weights.items():
                    layer = self.bottleneck_layers[key]
                    device = layer.down.device
                    tensors = [t.to(device, torch.float32) for t in tensors]
                    points[key] = layer.attach_trainable(slot, *tensors, activation, scaling)
            self._trainable[name] = TrainableBottleneck(name, slot, options, points)
            self._registry[name] = BottleneckAdapter(
                name=name, path=path, activation=activation, scaling=scaling, points={}
            )
            self._slot_of[name] = slot

    def _trainable_adapter(self, name: str) -> TrainableAdapter:
        if name not in self._trainable:
            kind = "frozen" if name in self._registry else "unknown"
            raise KeyError(
                f"{name!r} is not a trainable adapter ({kind}); trainable: {list(self._trainable)}"
            )
        return self._trainable[name]

    def named_parameters(self, name: str):
        """(PEFT key, fp32 parameter) of a trainable adapter, e.g.
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", A [r, H_in]);
        AdapterHub's keys for a bottleneck adapter."""
        adapter = self._trainable_adapter(name)
        if isinstance(adapter, TrainableBottleneck):
            # AdapterHub's keys, e.g. "model.layers.0.output_adapters.adapters.x.adapter_up.bias".
            for (index, point), parameters in adapter.points.items():
                for part, parameter in parameters.named():
                    yield adapterhub_key(self.blocks_path, index, point, name, part), parameter
            return
        for path, layer in adapter.layers.items():
            yield f"{KEY_PREFIX}{path}.lora_A.weight", layer.A
            yield f"{KEY_PREFIX}{path}.lora_B.weight", layer.B

    def parameters(self, name: str):
        """The fp32 parameters of a trainable adapter (one optimizer param group per adapter)."""
        return [p for _, p in self.named_parameters(name)]

    @property
    def trainable_adapters(self) -> list[str]:
        """Names of the adapters that are trainable now (until freeze())."""
        return list(self._trainable)

    def save_adapter(self, name: str, directory: str) -> None:
        """Writes a trainable adapter as a PEFT folder (PeftModel.from_pretrained loads it), or
        a bottleneck adapter as an AdapterHub folder (load_adapter reads both back)."""
        adapter = self._trainable_adapter(name)
        if isinstance(adapter, TrainableBottleneck):
            save_adapterhub_folder(adapter, directory, self.blocks_path, self.model)
            return
        fan_in_fan_out = any(
            not isinstance(self.layers[p].base_layer, nn.Linear) for p in adapter.layers
        )
        save_peft_folder(adapter, directory, fan_in_fan_out)

    def freeze(self, name: str) -> None:
        """Turns a trainable adapter into an ordinary served one (base dtype, same slot)."""
        with self._changed:
            adapter = self._trainable_adapter(name)
            self._changed.wait_for(lambda: self._pins[name] == 0)
            dtype = next(iter(self.layers.values())).lora_A.dtype
            if isinstance(adapter, TrainableBottleneck):
                self._freeze_bottleneck(adapter, dtype)
                return
            served = {}
            for path, layer in adapter.layers.items():
                A, B = self._host_copy(layer.A, dtype), self._host_copy(layer.B.t(), dtype)
                served[path] = LoraWeights(A=A, B=B, scale=layer.scale)
            for layer in self.layers.values():
                layer.detach_trainable(adapter.slot)
            del self._trainable[name]
            self._registry[name] = LoraAdapter(name=name, path="<frozen>", layers=served)
            self._place(name, adapter.slot)

    def _host_copy(self, parameter: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A frozen adapter's host copy of a trainable tensor, in the served dtype (pinned when
        the slots are on a GPU, so that slot writes are real async copies)."""
        copy = parameter.detach().to("cpu", dtype).contiguous()
        return copy.pin_memory() if self.device.type == "cuda" else copy

    def _freeze_bottleneck(self, adapter: TrainableBottleneck, dtype: torch.dtype) -> None:
        served = {}
        for key, parameters in adapter.points.items():
            served[key] = BottleneckWeights(
                down=self._host_copy(parameters.down, dtype),
                down_bias=parameters.down_bias.detach().cpu().clone(),
                up=self._host_copy(parameters.up.t(), dtype),
                up_bias=parameters.up_bias.detach().cpu().clone(),
            )
        for layer in self.bottleneck_layers.values():
            layer.detach_trainable(adapter.slot)
        del self._trainable[adapter.name]
        self._registry[adapter.name] = BottleneckAdapter(
            name=adapter.name,
            path="<frozen>",
            activation=adapter.activation,
            scaling=adapter.scaling,
            points=served,
        )
        self._place(adapter.name, adapter.slot)

    @contextlib.contextmanager
    def forward_session(self):
        """Held by every forward of the patched model: the weights and the merge state it
        reads stay as they are until it returns."""
        with self._changed:
            self._changed.wait_for(lambda: not self._rewriting_weights)
            self._forwards_in_flight += 1
        try:
            yield
        finally:
            with self._changed:
                self._forwards_in_flight -= 1
                self._changed.notify_all()

    @contextlib.contextmanager
    def _weights_rewrite(self):
        with self._changed:
            self._changed.wait_for(lambda: not self._rewriting_weights)
            self._rewriting_weights = True
            self._changed.wait_for(lambda: self._forwards_in_flight == 0)
        try:
            yield
        finally:
            with self._changed:
                self._rewriting_weights = False
                self._changed.notify_all()

    def merge(self, spec, **options) -> None:
        """Folds one adapter (a name) or a weighted combination of adapters ({name: weight})
        into the base weights of every adapted layer; see _merge for the options. Waits for
        forwards in flight; forwards that start meanwhile wait for the merge."""
        with self._weights_rewrite():
            self._merge(spec, **options)

    def unmerge(self) -> None:
        """Restores every merged base weight bit for bit (after forwards in flight)."""
        with self._weights_rewrite():
            self._unmerge()

    def _merge(
        self,
        spec,
        *,
        method: str = "linear",
        density: Optional[float] = None,
        majority_sign: str = "total",
        seed: int = 0,
    ) -> None:
        """Folds one adapter (a name) or a weighted combination of adapters ({name: weight})
        into the base weights of every adapted layer. method: "linear" (the exact weighted sum
        of the deltas) or one of PEFT's "ties", "dare_linear", "dare_ties", "magnitude_prune"
        on full deltas, with density, majority_sign and seed (adaptfuse.merge explains each
        and its memory). Refused while a merge is in effect. A merge that fails midway (a
        result that would not be finite...) restores every layer it touched."""
        weights = {spec: 1.0} if isinstance(spec, str) else {n: float(w) for n, w in spec.items()}
        if self.merged is not None:
            current = ", ".join(repr(n) for n in self.merged)
            raise ValueError(f"{current} is merged; call unmerge() first")
        if not weights:
            raise ValueError("merge() needs an adapter name or a non-empty {name: weight} mapping")
        options = MergeOptions(method, density, majority_sign, seed)
        unknown = [n for n in weights if n not in self._registry]
        if unknown:
            raise KeyError(f"unknown adapter name(s) {unknown}; loaded: {self.adapters}")
        for n in weights:
            self._refuse_trainable(n, "merge")
            if isinstance(self._registry[n], BottleneckAdapter):
                raise ValueError(
                    f"{n!r} is a bottleneck adapter: it cannot be merged, since its "
                    "nonlinearity cannot fold into a weight; serve it through adapter_names"
                )
        from tqdm.auto import tqdm

        done: list[LayerMerge] = []
        layers = list(self.layers.items())
        try:
            for path, layer in tqdm(layers, desc="merging", disable=len(layers) < 64, leave=False):
                terms = merge_terms([(self._registry[n], w) for n, w in weights.items()], path)
                if terms:
                    done.append(merge_layer(path, layer.weight_out_in(), terms, options))
        except BaseException:
            self._unmerge_layers(done, options)
            raise
        self._merge_records, self._merge_options = done, options
        self.merged = weights

    def _unmerge(self) -> None:
        if self.merged is None:
            raise ValueError("no adapter is merged")
        self._unmerge_layers(self._merge_records, self._merge_options)
        self._merge_records = []
        self.merged = None

    def _unmerge_layers(self, merges: list[LayerMerge], options: MergeOptions) -> None:
        for merge in reversed(merges):
            unmerge_layer(self.layers[merge.path].weight_out_in(), merge, options)

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


class StaticAssignment:
    """Each sequence's adapter for a step captured into a CUDA graph (DESIGN.md: loading,
    unloading and swapping never invalidate a captured graph).

    A graph replays the same device addresses, so the adapters cannot travel as a Python
    list: this object owns one device buffer of token slot ids [batch * sequence] that the
    captured forward reads (the plan is rebuilt from it on the device, inside the graph).
    assign() brings the named adapters into slots, pins them (they keep their slots while
    assigned) and writes their slot ids into the buffer, stream-ordered after the replays
    already launched. Use it as ``model(ids, adapter_names=assignment, ...)``.
    """

    def __init__(self, manager: AdapterManager, batch: int, sequence: int = 1):
        if batch < 1 or sequence < 1:
            raise ValueError(
                f"static_assignment needs batch, sequence >= 1, got {batch}, {sequence}"
            )
        self.manager = manager
        self.batch = batch
        self.sequence = sequence
        self.names: list[Optional[str]] = [None] * batch
        self._pinned: list[str] = []
        self.token_slots = torch.full(
            (batch * sequence,), -1, dtype=torch.int32, device=manager.device
        )

    def assign(self, adapter_names: Sequence[Optional[str]]) -> None:
        """Sets each sequence's adapter (None or "__base__": the base model). Outside capture
        only; on a refusal the previous assignment stays in effect."""
        if not isinstance(adapter_names, (list, tuple)) or len(adapter_names) != self.batch:
            raise ValueError(
                f"assign() needs a list of {self.batch} adapter names (the static batch), "
                f"got {adapter_names!r}"
            )
        if self.token_slots.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "assign() changes what a captured graph reads: call it between replays"
            )
        slot_ids, self._pinned = self.manager.acquire(
            adapter_names, releasing=self._pinned, static=True
        )
        self.names = list(adapter_names)
        # Stream-ordered: replays launched before this read the previous ids.
        host = torch.tensor(slot_ids, dtype=torch.int32).repeat_interleave(self.sequence)
        self.token_slots.copy_(host)

    def close(self) -> None:
        """Every sequence back to the base model; the adapters' slots are free to reuse."""
        self.assign([None] * self.batch)

    def plans_for(self, manager: AdapterManager, batch: int, sequence: int) -> BatchPlans:
        if manager is not self.manager:
            raise ValueError("this static assignment belongs to another patched model")
        if (batch, sequence) != (self.batch, self.sequence):
            raise ValueError(
                f"the static assignment is for inputs [{self.batch}, {self.sequence}] "
                f"but the forward got [{batch}, {sequence}]"
            )
        return BatchPlans(self.token_slots, manager.max_loras)

    def __repr__(self) -> str:
        return f"StaticAssignment(batch={self.batch}, sequence={self.sequence}, names={self.names})"
