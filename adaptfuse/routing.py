"""A/B routing: send each request key to an adapter arm, the same arm every time.

    split = adaptfuse.routing.Split({"v1": 0.9, "v2": 0.1})
    names = split.names(user_ids)              # ["v1", "v1", "v2", ...], one per request
    model.generate(input_ids, adapter_names=names, ...)
    split.counts                               # {"v1": 913, "v2": 87}

The arm of a key is a function of the key, the arms' weights and the salt only: SHA-256
(never Python's hash(), which is salted per process), so every process, machine and restart
agrees, and a user stays in their arm for the whole experiment.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Iterable, Mapping
from typing import Optional, Union

Key = Union[str, int, bytes]
# Weights are fractions of traffic: their sum may miss 1 by float rounding only.
_SUM_TOLERANCE = 1e-9


def _key_bytes(key: Key) -> bytes:
    # bool is an int subclass whose str() is "True": refused, as an ambiguous key.
    if isinstance(key, bytes):
        return key
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key).encode("ascii")
    raise TypeError(
        f"routing keys must be str, int or bytes (stable across processes), "
        f"got {type(key).__name__}: {key!r}"
    )


class Split:
    """Deterministic weighted assignment of request keys to arms (adapter names).

    arms: {name: fraction of traffic}; a name is an adapter name, or None for the base
    model. Fractions are finite, >= 0 and sum to 1 (an arm at 0 gets no traffic, which
    keeps it in the counts while it is switched off). salt: distinguishes experiments, so
    that two splits over the same keys are independent; the same salt and weights always
    give the same assignment.

    A key hashes to a point u in [0, 1) (the first 8 bytes of SHA-256(salt, key)), and the
    arm is the one whose slice of [0, 1) holds u, slices laid out in the order of `arms`.
    Moving weight between neighbouring arms therefore moves only the keys that must move.
    Keys are str, int or bytes; an int and its decimal string are the same key.
    """

    def __init__(self, arms: Mapping[Optional[str], float], salt: str = ""):
        if not isinstance(arms, Mapping) or not arms:
            raise ValueError(f"Split needs a non-empty {{arm: weight}} mapping, got {arms!r}")
        if not isinstance(salt, str):
            raise TypeError(f"salt must be a str, got {type(salt).__name__}")
        for name, weight in arms.items():
            if name is not None and (not isinstance(name, str) or not name):
                raise ValueError(
                    f"arm names must be adapter names (non-empty str) or None for the base "
                    f"model, got {name!r}"
                )
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise TypeError(f"the weight of arm {name!r} must be a number, got {weight!r}")
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(
                    f"the weight of arm {name!r} is {weight}: weights are fractions in [0, 1]"
                )
        total = math.fsum(arms.values())
        if abs(total - 1.0) > _SUM_TOLERANCE:
            raise ValueError(
                f"the arms' weights sum to {total!r}, not 1: they are fractions of traffic "
                f"({dict(arms)})"
            )
        self.arms: dict[Optional[str], float] = dict(arms)
        self.salt = salt
        # Upper end of each arm's slice of [0, 2**64), as integers: comparisons on the hash
        # itself leave no float rounding between processes.
        self._bounds: list[tuple[int, Optional[str]]] = []
        cumulative = 0.0
        for name, weight in self.arms.items():
            cumulative += weight
            self._bounds.append((min(round(cumulative * 2**64), 2**64), name))
        last_named = max(i for i, (_, name) in enumerate(self._bounds) if self.arms[name] > 0)
        # The last arm with traffic ends at 2**64 exactly, whatever the rounding of the sum.
        self._bounds[last_named] = (2**64, self._bounds[last_named][1])
        self._prefix = salt.encode("utf-8") + b"\x00"
        self._counts = dict.fromkeys(self.arms, 0)
        self._lock = threading.Lock()

    def arm_of(self, key: Key) -> Optional[str]:
        """The arm of one key (an adapter name, or None); does not count it."""
        digest = hashlib.sha256(self._prefix + _key_bytes(key)).digest()
        point = int.from_bytes(digest[:8], "big")
        for bound, name in self._bounds:
            if point < bound:
                return name
        raise AssertionError("unreachable: the last arm with traffic ends at 2**64")

    def assign(self, key: Key) -> Optional[str]:
        """The arm of one request key, counted in `counts`."""
        name = self.arm_of(key)
        with self._lock:
            self._counts[name] += 1
        return name

    def names(self, keys: Iterable[Key]) -> list[Optional[str]]:
        """One arm per key: pass the list straight as adapter_names (len(keys) entries, None
        meaning the base model). Every key is counted in `counts`."""
        names = [self.arm_of(key) for key in keys]
        with self._lock:
            for name in names:
                self._counts[name] += 1
        return names

    @property
    def counts(self) -> dict[Optional[str], int]:
        """Requests assigned so far per arm (a copy; every arm listed, zeros included)."""
        with self._lock:
            return dict(self._counts)

    def reset_counts(self) -> None:
        """Starts counting afresh (the assignment itself never changes)."""
        with self._lock:
            self._counts = dict.fromkeys(self.arms, 0)

    def __repr__(self) -> str:
        salt = f", salt={self.salt!r}" if self.salt else ""
        return f"Split({self.arms!r}{salt})"


__all__ = ["Split"]
