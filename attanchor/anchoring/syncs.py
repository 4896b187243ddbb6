"""Host synchronisation: count the reads-back of a forward, and statistics read only on demand.

On a GPU every value the host reads from a device tensor (``.item()``, ``int(t)``, ``if
t.any()``, ``t.tolist()``) and every op whose output shape depends on values (``nonzero``,
boolean indexing, ``masked_select``) waits for the launch queue to drain. ``count_host_syncs``
counts them on any device, a CPU included, at the aten level, with the line that caused each:

    >>> import torch
    >>> with count_host_syncs() as syncs:
    ...     n = int(torch.ones(3).sum())            # one scalar read
    ...     _ = torch.arange(4)[torch.arange(4) > 1]  # one value-dependent shape
    >>> syncs.total, sorted(syncs.by_kind)
    (2, ['_local_scalar_dense', 'index (bool mask)'])

``LazyStats`` keeps statistics as 0-d tensors and turns one into a float only when it is read,
so recording them costs no synchronisation (``AnchoredVLM.last_stats``).
"""

from __future__ import annotations

import traceback
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops whose result the host must read (scalars) or whose output shape depends on values.
_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim",
             "unique_consecutive", "masked_scatter"}
# masked_scatter: CUDA computes the source offsets with a prefix sum and checks their count.
_TORCH_DIR = str(Path(torch.__file__).parent)


@dataclass
class SyncCount:
    """What ``count_host_syncs`` saw: ``total``, ``by_kind`` (op name -> count) and
    ``by_site`` ("file.py:line" of the first caller outside torch -> count)."""

    total: int = 0
    by_kind: Counter = field(default_factory=Counter)
    by_site: Counter = field(default_factory=Counter)

    def add(self, kind: str) -> None:
        self.total += 1
        self.by_kind[kind] += 1
        site = "?"
        for frame in reversed(traceback.extract_stack()[:-2]):
            if not frame.filename.startswith(_TORCH_DIR) and "syncs.py" not in frame.filename:
                site = f"{Path(frame.filename).name}:{frame.lineno}"
                break
        self.by_site[site] += 1


class _Dispatch(TorchDispatchMode):
    def __init__(self, count: SyncCount) -> None:
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = func._schema.name.split("::")[-1]
        if name in _SYNC_OPS:
            self.count.add(name)
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
                isinstance(i, Tensor) and i.dtype == torch.bool for i in (args[1] or ())
                if i is not None):
            self.count.add("index (bool mask)")
        return func(*args, **(kwargs or {}))


class _Function(TorchFunctionMode):
    """``tolist``/``numpy`` read memory directly on a CPU tensor (no aten op to see)."""

    def __init__(self, count: SyncCount) -> None:
        super().__init__()
        self.count = count

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func in (Tensor.tolist, Tensor.numpy):
            self.count.add(func.__name__)
        return func(*args, **(kwargs or {}))


@contextmanager
def count_host_syncs() -> Iterator[SyncCount]:
    """Count the host synchronisations of the ops run inside (module doc); works on a CPU.

    Device-to-host copies (``.cpu()``) are not counted: on a CPU they are not visible as such.
    """
    count = SyncCount()
    with _Function(count), _Dispatch(count):
        yield count


class LazyStats(Mapping):
    """A read-only mapping of 0-d tensors (or floats) that yields Python floats on access.

    Storing costs nothing; reading ``stats["growth_pct"]`` synchronises once for that value.
    """

    def __init__(self, values: Mapping[str, Tensor | float]) -> None:
        self._values = dict(values)

    def __getitem__(self, key: str) -> float:
        v = self._values[key]
        return float(v.detach()) if isinstance(v, Tensor) else float(v)

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def tensors(self) -> dict[str, Any]:
        """The stored values, unread (tensors stay on their device)."""
        return dict(self._values)

    def __repr__(self) -> str:
        return f"LazyStats({sorted(self._values)})"
