"""Key index backends (imported as ``ndb.indexes``): one interface, several implementations.

=============  ================================================================  ===============
kind           what                                                              key memory
=============  ================================================================  ===============
flat           exact, FAISS IndexFlatIP, float32                                 4*d + ~40 B
flat-fp16      exact, FAISS flat scalar quantizer, float16                       2*d + ~40 B
ivf            approximate, FAISS IVF over float16 (``codec="fp32"`` possible)   2*d + ~40 B
ivf-pq         approximate, FAISS IVF over PQ codes (``pq_m`` bytes, d/4)        d/4 + ~40 B
ivf-pq4        approximate, fast-scan IVF over 4-bit PQ codes, exact rerank      2.06*d + ~40 B
ivf-pca        approximate, FAISS IVF over d/4-dim projections, exact rerank     2.5*d + ~40 B
torch          exact, torch tensor on any device (fp32 on CPU, fp16 on CUDA)     2*d + 24 B
gpu-flat       exact, FAISS GpuIndexFlatIP (optional faiss-gpu build)            2*d + 16 B
=============  ================================================================  ===============

``make_index("auto", dim, n_keys=..., device=...)`` picks a kind with :func:`choose_index_kind`.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Any

from ndb.errors import ConfigError
from ndb.indexes.base import GpuUnavailableError, KeyIndex

# kind -> where its class lives: a backend's module is imported only when an index of its
# kind is made or loaded, so a database loads just the backend it uses
_CLASSES = {
    "flat": "ndb.indexes.flat:FlatIndex",
    "flat-fp16": "ndb.indexes.flat:Fp16FlatIndex",
    "ivf": "ndb.indexes.ivf:IVFIndex",
    "ivf-pq": "ndb.indexes.ivf:IVFPQIndex",
    "ivf-pq4": "ndb.indexes.ivf:IVFPQ4Index",
    "ivf-pca": "ndb.indexes.ivf:IVFPCAIndex",
    "torch": "ndb.indexes.torch_index:TorchIndex",
    "gpu-flat": "ndb.indexes.gpu:GpuFlatIndex",
}
BACKENDS = tuple(_CLASSES)  # the kinds an index can be
APPROXIMATE = ("ivf", "ivf-pq", "ivf-pq4", "ivf-pca")  # kinds whose search ``calibrate`` tunes
_DEVICE_KINDS = ("torch", "gpu-flat")  # backends whose constructor and load take ``device``

# Up to this many keys the CPU choice is exact search with torch, above it ivf-pq4 (whose own
# exact buffer covers the same range: min_train_keys = 8192). One query took 3.5 ms exact
# (torch) against 0.73 (ivf) at 10k keys, 53 against 8.6 at 100k (on 1 thread of this 2-core
# machine, benchmarks/results/bench_index.md); ivf-pq4 searched 5-26x faster than ivf and
# ivf-pca at 1M in the hook, with as many gate decisions differing from exact search (README,
# "A first stage that reads 32x less").
CPU_EXACT_MAX_KEYS = 8192


def check_kind(kind: str, *, auto: bool = False) -> None:
    """Refuse an index kind that is not a backend (nor "auto", where ``auto`` allows it)."""
    known = ["auto", *sorted(BACKENDS)] if auto else sorted(BACKENDS)
    if kind not in known:
        raise ConfigError(f"unknown index kind {kind!r} (known: {', '.join(known)})")


def choose_index_kind(n_keys: int, device: str = "cpu") -> str:
    """The backend for ``n_keys`` keys searched from ``device`` ("cpu", "cuda", "cuda:1", ...).

    On an accelerator the exact ``torch`` index: one fp16 matmul reads 2*d bytes per key, about
    3 GB at 1M keys, i.e. ~1 ms at H100 bandwidth (an estimate: not measured here), and it
    needs no extra package (``gpu-flat`` is an explicit choice). On CPU exact ``torch``
    (float32) up to ``CPU_EXACT_MAX_KEYS``, ``ivf-pq4`` above.
    """
    if n_keys < 0:
        raise ValueError(f"n_keys must be non-negative, got {n_keys}")
    if not str(device).startswith("cpu"):
        return "torch"
    return "torch" if n_keys <= CPU_EXACT_MAX_KEYS else "ivf-pq4"


def make_index(kind: str, dim: int, *, n_keys: int | None = None, device: str | None = None,
               **options: Any) -> KeyIndex:
    """A new empty index of ``kind`` ("auto": chosen from ``n_keys`` and ``device``).

    ``device`` reaches the backends that place keys on a device (torch: default "cpu";
    gpu-flat: default GPU 0); ``options`` are the backend's keyword arguments (e.g. ``nprobe``
    for ivf, ``dtype`` for torch).
    """
    check_kind(kind, auto=True)
    if kind == "auto":
        if n_keys is None:
            raise ValueError("make_index('auto', ...) needs n_keys, the expected number of keys")
        kind = choose_index_kind(n_keys, device or "cpu")
    if kind in _DEVICE_KINDS:
        if device is not None:
            options["device"] = device
    elif device is not None and not str(device).startswith("cpu"):
        raise ValueError(f"index kind {kind!r} runs on the CPU only, not on {device!r}")
    return _backend(kind)(dim, **options)


def load_index(kind: str, path: Path, dim: int, *, device: str | None = None) -> KeyIndex:
    """Read an index of ``kind`` written by its ``save``; torch and gpu-flat indexes go to
    ``device`` (default: CPU for torch, GPU 0 for gpu-flat)."""
    check_kind(kind)
    if kind in _DEVICE_KINDS and device is not None:
        return _backend(kind).load(path, dim, device=device)
    return _backend(kind).load(path, dim)


def _backend(kind: str) -> type[KeyIndex]:
    module, name = _CLASSES[kind].split(":")
    return getattr(import_module(module), name)


__all__ = ["BACKENDS", "CPU_EXACT_MAX_KEYS", "GpuUnavailableError", "KeyIndex", "check_kind",
           "choose_index_kind", "load_index", "make_index"]
