"""Synthetic fact keys and token queries shaped like real FFN keys, for tests and benchmarks.

Real keys (inputs of an FFN output projection) are far from isotropic. Measured on 8,207 token
keys of SmolLM2-135M (layer 8 down_proj input, CounterFact prompts), after L2 normalization:
norm of the mean key 0.30; pairwise cosine quantiles 10/50/90 % = -0.12 / 0.08 / 0.28; the top
10 / 100 / 300 principal directions hold 41 / 72 / 90 % of the centered variance; two coordinates
("massive activations") hold 12 % and 11 % of the energy. The generator below mixes a common
mean direction, two spiky coordinates, a clustered power-law low-rank part and isotropic noise,
fitted to those numbers (it gives 0.28; -0.18 / 0.09 / 0.33; 40 / 66 / 83 %; 17 % and 10 %).

Hits (the same subject in another context) differ from their key in a way that is neither
isotropic nor like the gap between two unrelated tokens: for 440 CounterFact paraphrases, the
top 10 / 50 / 300 principal directions hold 7 / 18 / 46 % of the perturbation's energy, against
37 / 58 / 80 % for the difference of two random tokens and 0.7 / 3 / 20 % for isotropic noise.
:func:`noisy_copies` matches that by drawing 30 % of the perturbation energy from the key
distribution and the rest isotropically.
"""

from __future__ import annotations

import numpy as np

_GEOMETRY_SEED = 12345  # fixed: keys and queries drawn with any seed share one "model"
_RANK = 384
_ALPHA = 0.43  # low-rank spectrum decays as (1 + j) ** -alpha
_MEAN_WEIGHT = 0.51
_CLUSTERS = 1024
_CLUSTER_WEIGHT = 1.0
_NOISE = 0.83
_SPIKE_MEAN = 0.57
_SPIKE_SD = 2.8


class KeyDistribution:
    """A fixed anisotropic distribution over unit vectors of dimension ``dim``."""

    def __init__(self, dim: int = 1536):
        if dim < 8:
            raise ValueError(f"dim must be at least 8, got {dim}")
        self.dim = dim
        rank = min(_RANK, dim // 4)
        g = np.random.default_rng(_GEOMETRY_SEED)
        mean = g.standard_normal(dim)
        self.mean = (mean / np.linalg.norm(mean)).astype(np.float32)
        basis, _ = np.linalg.qr(g.standard_normal((dim, rank)))
        # the first two low-rank directions are coordinate axes: the spiky coordinates
        basis[:, :2] = 0.0
        basis[:2, :] = 0.0
        basis[0, 0] = basis[1, 1] = 1.0
        self.basis = basis.astype(np.float32)
        scale = (1.0 + np.arange(rank)) ** -_ALPHA
        self.scale = scale / np.linalg.norm(scale)
        self.centers = g.standard_normal((_CLUSTERS, rank))

    def sample(self, n: int, seed: int, chunk: int = 32768) -> np.ndarray:
        """``n`` unit vectors (float32), generated in chunks to bound memory."""
        rng = np.random.default_rng(seed)
        out = np.empty((n, self.dim), np.float32)
        rank = self.basis.shape[1]
        for start in range(0, n, chunk):
            b = min(chunk, n - start)
            z = _CLUSTER_WEIGHT * self.centers[rng.integers(_CLUSTERS, size=b)]
            z += rng.standard_normal((b, rank), dtype=np.float32)
            spikes = rng.standard_normal((b, 2), dtype=np.float32)
            z[:, :2] = np.array([1.0, -1.0]) * _SPIKE_MEAN + _SPIKE_SD * spikes
            x = (z * self.scale).astype(np.float32) @ self.basis.T + _MEAN_WEIGHT * self.mean
            x += _NOISE / np.sqrt(self.dim) * rng.standard_normal((b, self.dim), dtype=np.float32)
            out[start:start + b] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out


def synthetic_keys(n: int, dim: int = 1536, seed: int = 0) -> np.ndarray:
    """``n`` L2-normalized float32 keys from :class:`KeyDistribution`."""
    return KeyDistribution(dim).sample(n, seed)


def noisy_copies(keys: np.ndarray, cosines: np.ndarray, seed: int,
                 context_share: float = 0.3) -> np.ndarray:
    """Each key moved to cosine ``cosines[i]`` with itself: the same subject in another context.

    A share ``context_share`` of the perturbation's energy is a fresh draw of the key
    distribution (anisotropic), the rest isotropic; both orthogonal to the key.
    """
    keys = np.asarray(keys, np.float32)
    rng = np.random.default_rng(seed)
    context = KeyDistribution(keys.shape[1]).sample(len(keys), seed)
    context -= context.mean(axis=0)
    iso = rng.standard_normal(keys.shape, dtype=np.float32)
    parts = []
    for x in (context, iso):
        x -= np.sum(x * keys, axis=1, keepdims=True) * keys
        parts.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    other = np.sqrt(context_share) * parts[0] + np.sqrt(1.0 - context_share) * parts[1]
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    c = np.asarray(cosines, np.float32)[:, None]
    return c * keys + np.sqrt(1.0 - c * c) * other


def gate_queries(keys: np.ndarray, n_hits: int, n_misses: int, seed: int = 1,
                 cos_range: tuple[float, float] = (0.55, 0.99)) -> np.ndarray:
    """Queries for gate-agreement checks: noisy copies of random stored keys (cosine to their key
    uniform in ``cos_range``, so many land near the gate) followed by unrelated draws."""
    rng = np.random.default_rng(seed)
    picked = keys[rng.integers(len(keys), size=n_hits)]
    hits = noisy_copies(picked, rng.uniform(*cos_range, size=n_hits), seed + 1)
    misses = KeyDistribution(keys.shape[1]).sample(n_misses, seed + 2)
    return np.concatenate([hits, misses]).astype(np.float32)
