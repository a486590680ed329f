"""NeuralDB: a directory of edited facts that attaches to a model like an adapter.

    db = NeuralDB.create("capitals.ndb", model, tokenizer)
    ids = db.add(facts)                  # computes keys and residuals, commits to disk
    db.attach(model)                     # the model now answers with the new facts
    with db.disabled(): ...              # ... or, for a while, without them
    db.remove(ids[:2]); db.detach()

Every mutation is committed to disk before it returns (see ndb.store), and the weights of
the model are never changed.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ndb import store as store_mod
from ndb.anchor import anchor_token_id
from ndb.compute import (
    ComputeConfig,
    background_keys,
    compute_keys,
    compute_residuals,
    context_prefixes,
)
from ndb.compute import _rows as residual_rows
from ndb.config import NeuralDBConfig
from ndb.errors import ConfigError, FactError, FactNotFoundError, ModelMismatchError, StoreError
from ndb.facts import Fact, as_facts
from ndb.hook import GatedRetrieval
from ndb.indexes import BACKENDS, KeyIndex, choose_index_kind, load_index, make_index
from ndb.models import (
    DEFAULT_MODEL,
    decoder_layers,
    default_edit_settings,
    ffn_dims,
    ffn_out_path,
    get_module,
    num_layers,
)
from ndb.output import check_writable
from ndb.residuals import DEFAULT_CACHE_BYTES, ResidualCache
from ndb.store import Store

INDEX_META = "index.json"
BACKGROUND = "background"  # background.npy: keys of generic text, for the key guard


def check_gamma(gamma: float) -> None:
    """The gate is a cosine threshold in [0, 1]: below 0 a key would pass for vectors
    pointing away from it, so nearly every token would be edited."""
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not 0 <= gamma <= 1:
        raise ConfigError(f"gamma must be a number in [0, 1] (a cosine threshold), "
                          f"got {gamma!r}")


def check_index_kind(kind: str) -> None:
    if kind != "auto" and kind not in BACKENDS:
        raise ConfigError(f"unknown index kind {kind!r} (known: auto, "
                          f"{', '.join(sorted(BACKENDS))})")


def check_creatable(path: str | Path) -> None:
    """A new database can be made at ``path``: nothing is there (or an empty directory),
    and the nearest existing folder is writable."""
    path = Path(path)
    if path.is_dir() and not any(path.iterdir()):
        return
    if path.exists():
        what = ("a fact database" if (path / store_mod.CONFIG).is_file()
                else "a directory that is not empty" if path.is_dir() else "a file")
        raise StoreError(f"{path} already exists and is {what}")
    check_writable(path, what="directory")


def check_encodable(facts: Sequence[Fact], model: nn.Module, tokenizer,
                    prefixes: Sequence[str]) -> None:
    """Refuse, before any computation, a fact whose residual could not be computed: a
    subject that yields no token in its prompt, or a text longer than the model's context."""
    context = (getattr(model.config, "max_position_embeddings", None)
               or getattr(model.config, "n_positions", None))
    for i, fact in enumerate(facts):
        try:
            rows = residual_rows(tokenizer, [fact], prefixes)
        except ValueError:  # no token ends inside the subject's span
            raise FactError(f"fact {i + 1} ({fact.text[:60]!r}): the subject "
                            f"{fact.subject!r} yields no token in its prompt") from None
        longest = max(len(row.ids) for row in rows)
        if context and longest > context:
            raise FactError(f"fact {i + 1} ({fact.text[:60]!r}): {longest} tokens with its "
                            f"context prefix and target; the model reads at most {context}")


def fingerprint(model: nn.Module, layer: int) -> str:
    """Hash of the edited layer's weights, rounded to bfloat16 so that the same model in
    float32, bfloat16 or on another device has the same fingerprint."""
    digest = hashlib.sha256()
    for name, param in sorted(decoder_layers(model)[layer].named_parameters()):
        digest.update(name.encode())
        rounded = param.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy()
        digest.update(rounded.tobytes())
    return digest.hexdigest()[:16]


def model_name(model: nn.Module) -> str:
    return str(getattr(model.config, "name_or_path", "") or DEFAULT_MODEL)


class NeuralDB:
    """A fact database in a directory; see the module docstring."""

    def __init__(self, path: str | Path, *, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.path = Path(path)
        if not (self.path / store_mod.CONFIG).is_file():
            raise StoreError(f"{self.path}: not a fact database (no {store_mod.CONFIG})")
        try:
            self.config = NeuralDBConfig.read(self.path / store_mod.CONFIG)
        except (ValueError, TypeError) as err:
            raise StoreError(f"{self.path}/{store_mod.CONFIG}: {err}") from None
        self.store = Store(self.path)
        self._cache_bytes = cache_bytes
        self._index: KeyIndex | None = None
        self._index_version = -1
        self._device = "cpu"  # where the index searches: the attached model's device
        self._background: np.ndarray | None = None
        self._synced_version = self.store.manifest.version
        self._facts: dict[int, Fact] | None = None
        self._model: nn.Module | None = None
        self._tokenizer = None
        self._retrieval: GatedRetrieval | None = None
        self._residuals: ResidualCache | None = None

    # -- creation and persistence ----------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        model: nn.Module,
        tokenizer,
        *,
        layer: int | None = None,
        gamma: float | None = None,
        seed: int = 0,
        compute: ComputeConfig | None = None,
        index: str = "auto",
        key_dtype: str = "float16",
        residual_dtype: str = "float32",
    ) -> NeuralDB:
        """An empty database for ``model``; facts are added with :meth:`add`."""
        check_creatable(path)  # before minutes of computation, not after
        if gamma is not None:
            check_gamma(gamma)
        check_index_kind(index)
        for name, dtype in (("key_dtype", key_dtype), ("residual_dtype", residual_dtype)):
            if dtype not in ("float16", "float32"):
                raise ConfigError(f"{name} must be float16 or float32, got {dtype!r}")
        if layer is not None and (isinstance(layer, bool)
                                  or not isinstance(layer, numbers.Integral)):
            raise ConfigError(f"layer must be an integer, got {layer!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
        default_layer, default_gamma = default_edit_settings(model)
        layer = default_layer if layer is None else int(layer)
        gamma = default_gamma if gamma is None else gamma
        seed = int(seed)
        module = ffn_out_path(model, layer)
        d_key, d_value = ffn_dims(model, layer)
        compute = compute or ComputeConfig()
        config = NeuralDBConfig(
            model_name=model_name(model),
            model_type=model.config.model_type,
            num_layers=num_layers(model),
            fingerprint=fingerprint(model, layer),
            layer=layer,
            module=module,
            d_key=d_key,
            d_value=d_value,
            gamma=float(gamma),
            anchor_token_id=anchor_token_id(tokenizer),
            prefixes=context_prefixes(model, tokenizer, compute.n_prefixes,
                                      compute.prefix_tokens, seed),
            seed=seed,
            key_dtype=key_dtype,
            residual_dtype=residual_dtype,
            index=index,
            compute=compute,
        )
        background = background_keys(model, tokenizer, layer, seed).numpy().astype(np.float16)
        store_mod.create(Path(path), config.to_dict(), {BACKGROUND: background})
        db = cls(path)
        db._tokenizer = tokenizer
        db._model = model
        return db

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> NeuralDB:
        return cls(path, **kwargs)

    def save_pretrained(self, path: str | Path) -> None:
        """Write a compact copy of this database to ``path`` (which must not exist yet)."""
        path = Path(path)
        self.flush()
        if path.resolve() == self.path.resolve():
            return
        if path.exists():
            raise StoreError(f"{path} already exists")
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            for name in (store_mod.CONFIG, store_mod.MANIFEST):
                shutil.copy2(self.path / name, staging / name)
            shutil.copytree(self.path / store_mod.SEGMENTS, staging / store_mod.SEGMENTS)
            (staging / store_mod.INDEX).mkdir()
            copy = Store(staging)
            copy.compact()
            copy.close()
            shutil.move(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def flush(self) -> None:
        """Persist the key index, so that the next open needs no rebuild."""
        if self._index is not None and self._index_version != self._saved_index_version():
            self._save_index()

    def close(self) -> None:
        self.detach()
        self.store.close()

    # -- facts ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.store.entries)

    @property
    def ids(self) -> np.ndarray:
        return self.store.entries.ids.copy()

    def facts(self) -> dict[int, Fact]:
        """All facts by id (read once, then kept up to date)."""
        self.refresh()
        if self._facts is None:
            records = self.store.read("facts") if len(self) else []
            self._facts = {int(i): Fact.from_json(json.loads(r))
                           for i, r in zip(self.store.entries.ids, records)}
        return self._facts

    def get(self, fact_id: int) -> Fact:
        try:
            return self.facts()[int(fact_id)]
        except KeyError:
            raise FactNotFoundError(f"no fact with id {fact_id} in {self.path}") from None

    def lookup(self, facts: Iterable[Fact]) -> list[int]:
        """Ids of facts stored with the same subject, prompt and new object, in order."""
        by_edit = {(f.subject, f.prompt, f.target_new): i for i, f in self.facts().items()}
        ids = []
        for fact in facts:
            key = (fact.subject, fact.prompt, fact.target_new)
            if key not in by_edit:
                raise FactNotFoundError(f"{self.path} holds no edit {fact.text!r} -> "
                                        f"{fact.target_new!r}")
            ids.append(by_edit[key])
        return ids

    def find(self, subject: str) -> list[int]:
        """Ids of the facts about ``subject`` (exact match)."""
        return [i for i, f in self.facts().items() if f.subject == subject]

    # -- mutation ------------------------------------------------------------------------
    def add(
        self,
        facts: Iterable[Fact | dict],
        model: nn.Module | None = None,
        tokenizer=None,
        *,
        skip_existing: bool = False,
        progress: bool = False,
    ) -> list[int]:
        """Compute keys and residuals of ``facts`` and commit them; returns their new ids.

        Facts are committed a batch at a time, so an interrupted add keeps what was done;
        with ``skip_existing`` facts already in the database (same subject, prompt and new
        object) are skipped, which makes re-running an interrupted build resume it.
        """
        facts = as_facts(facts)
        model, tokenizer = self._require_model(model, tokenizer)
        check_encodable(facts, model, tokenizer, self.config.prefixes)
        with self.store.writing():
            self.refresh()
            existing = self.facts()
            if skip_existing:
                have = {(f.subject, f.prompt, f.target_new) for f in existing.values()}
                facts = [f for f in facts if (f.subject, f.prompt, f.target_new) not in have]
            taken = {f.id: i for i, f in existing.items() if f.id is not None}
            for f in facts:
                if f.id is not None and f.id in taken:
                    raise FactError(f"fact id {f.id!r} is already used by fact {taken[f.id]} "
                                     f"in {self.path}; use update() or remove it first")
            return self._write(facts, model, tokenizer, ids=None, progress=progress)

    def update(self, fact_id: int, fact: Fact | dict, model: nn.Module | None = None,
               tokenizer=None) -> None:
        """Re-edit fact ``fact_id`` (its id stays the same)."""
        (fact,) = as_facts([fact])
        model, tokenizer = self._require_model(model, tokenizer)
        check_encodable([fact], model, tokenizer, self.config.prefixes)
        with self.store.writing():
            self.refresh()
            self.get(fact_id)
            self._write([fact], model, tokenizer, ids=np.array([fact_id]), progress=False)

    def remove(self, ids: Iterable[int]) -> None:
        ids = np.unique(np.asarray(list(ids), dtype=np.int64))
        if len(ids) == 0:
            return
        with self.store.writing():
            self.refresh()
            try:
                self.store.entries.locate(ids)
            except KeyError as err:
                raise FactNotFoundError(
                    f"no fact with id {err.args[0]} in {self.path}; nothing was removed"
                ) from None
            self.store.delete(ids)
            self.refresh()

    def remove_subject(self, subject: str) -> list[int]:
        ids = self.find(subject)
        if not ids:
            raise FactNotFoundError(f"no fact about subject {subject!r} in {self.path}")
        self.remove(ids)
        return ids

    def set_gamma(self, gamma: float) -> None:
        check_gamma(gamma)
        guarded = self.config.compute.keys_per_fact > 1 and self.config.guard_margin is not None
        with self.store.writing():
            if guarded:  # which keys the guard keeps depends on gamma: index anew
                (self.path / store_mod.INDEX / INDEX_META).unlink(missing_ok=True)
                self._index = None
            self.config.gamma = float(gamma)
            store_mod.atomic_write_json(self.path / store_mod.CONFIG, self.config.to_dict())
        if self._retrieval is not None:
            self._retrieval.gamma = float(gamma)
            self._retrieval.index = self.index

    def add_vectors(self, facts: Iterable[Fact | dict], keys: torch.Tensor | np.ndarray,
                    residuals: torch.Tensor | np.ndarray) -> list[int]:
        """Commit facts whose keys and residuals were computed already (for experiments
        that reuse vectors, e.g. growing databases of 100 to 10k facts); returns ids."""
        facts = as_facts(facts)
        keys, residuals = torch.as_tensor(keys).float(), torch.as_tensor(residuals).float()
        per_fact = self.config.compute.keys_per_fact
        key_shape = ((len(facts), per_fact, self.config.d_key) if per_fact > 1
                     else (len(facts), self.config.d_key))
        expected = (key_shape, (len(facts), self.config.d_value))
        if (tuple(keys.shape), tuple(residuals.shape)) != expected:
            raise ValueError(f"expected keys and residuals of shapes {expected}, got "
                             f"{tuple(keys.shape)} and {tuple(residuals.shape)}")
        with self.store.writing():
            return self._commit(facts, keys, residuals, None)

    @property
    def background(self) -> np.ndarray:
        """Keys of generic text (written at creation): what a fact key must not match."""
        if self._background is None:
            path = self.path / f"{BACKGROUND}.npy"
            self._background = (np.load(path).astype(np.float32) if path.is_file()
                                else np.zeros((0, self.config.d_key), np.float32))
        return self._background

    def _commit(self, facts: list[Fact], keys: torch.Tensor, residuals: torch.Tensor,
                ids: np.ndarray | None) -> list[int]:
        keys = torch.nn.functional.normalize(keys.float(), dim=-1)
        background = torch.from_numpy(self.background)
        scores = ((keys @ background.T).amax(-1) if len(background)
                  else torch.full(keys.shape[:-1], -1.0))
        written = self.store.append(
            keys.numpy().astype(self.config.key_dtype),
            residuals.float().numpy().astype(self.config.residual_dtype),
            [json.dumps(f.to_json(), ensure_ascii=False) for f in facts],
            ids=ids,
            key_scores=scores.numpy(),
        )
        self.refresh()
        return [int(i) for i in written]

    def _write(self, facts: list[Fact], model, tokenizer, ids, progress: bool) -> list[int]:
        self._check_model(model)
        cfg = self.config
        written: list[int] = []
        chunk = max(cfg.compute.batch_size, 1)
        bar = tqdm(total=len(facts), desc="edit", unit="fact", disable=not progress)
        with self._all_hooks_disabled(model):
            for start in range(0, len(facts), chunk):
                part = facts[start : start + chunk]
                keys = compute_keys(model, tokenizer, part, cfg.layer, cfg.prefixes,
                                    split=cfg.compute.keys_per_fact > 1)
                residuals = compute_residuals(model, tokenizer, part, cfg.layer, cfg.prefixes,
                                              cfg.compute)
                part_ids = None if ids is None else ids[start : start + chunk]
                written.extend(self._commit(part, keys, residuals, part_ids))
                bar.update(len(part))
        bar.close()
        return written

    # -- keeping the in-memory view in step with the disk ----------------------------------
    def refresh(self) -> None:
        """Catch up with changes committed to the directory (by this or another process)."""
        self.store.refresh()
        version = self.store.manifest.version
        if version == self._synced_version:
            return
        if self._residuals is not None:
            changed, deleted = self.store.read_entries_since(self._synced_version)
            self._residuals.forget(np.concatenate([changed, deleted]))
        if self._index is not None:
            if self.store.manifest.compacted_through > self._index_version:
                self._build_index()
            else:
                self._catch_up_index()
                if self.config.index == "auto" and self._index_kind() != self._index.kind:
                    self._build_index()
        if self._retrieval is not None:
            self._retrieval.index = self._index
        self._facts = None
        self._synced_version = version

    def _index_kind(self) -> str:
        kind = self.config.index
        n_keys = len(self) * self.config.compute.keys_per_fact
        return choose_index_kind(n_keys, self._device) if kind == "auto" else kind

    def _saved_index_version(self) -> int:
        meta = self.path / store_mod.INDEX / INDEX_META
        try:
            return int(json.loads(meta.read_text())["version"])
        except (FileNotFoundError, ValueError, KeyError):
            return -1

    def _load_saved_index(self) -> bool:
        meta_path = self.path / store_mod.INDEX / INDEX_META
        try:
            meta = json.loads(meta_path.read_text())
            if meta["kind"] != self._index_kind():
                return False
            if meta["version"] < self.store.manifest.compacted_through:
                return False
            index = load_index(meta["kind"], self.path / store_mod.INDEX / meta["file"],
                               self.config.d_key, device=self._device)
        except (FileNotFoundError, ValueError, KeyError, RuntimeError):
            return False
        self._index, self._index_version = index, int(meta["version"])
        return True

    def _index_entries(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Index rows of facts ``ids``: their keys, one row per key, under index ids
        ``fact_id * keys_per_fact + k`` (the hook divides to get the fact back)."""
        keys = self.store.read("keys", ids).astype(np.float32).reshape(-1, self.config.d_key)
        index_ids = self._index_ids(ids)
        if self.config.compute.keys_per_fact > 1 and self.config.guard_margin is not None:
            keep = self.guarded_keys(self.store.read("key_scores", ids)).reshape(-1)
            keys, index_ids = keys[keep], index_ids[keep]
        return keys, index_ids

    def guarded_keys(self, scores: np.ndarray) -> np.ndarray:
        """(n, keys_per_fact) bool: the keys that generic text does not reach within the
        guard margin of gamma; a fact whose keys all do keeps its least reached one."""
        keep = scores < self.config.gamma - self.config.guard_margin
        none = ~keep.any(axis=1)
        keep[none, scores[none].argmin(axis=1)] = True
        return keep

    def _index_ids(self, ids: np.ndarray) -> np.ndarray:
        per_fact = self.config.compute.keys_per_fact
        return (np.asarray(ids, np.int64)[:, None] * per_fact + np.arange(per_fact)).reshape(-1)

    def _build_index(self) -> None:
        index = make_index(self._index_kind(), self.config.d_key, device=self._device)
        if len(self):
            keys, index_ids = self._index_entries(self.store.entries.ids)
            if index.needs_training:
                index.train(keys)
            index.add(keys, index_ids)
        self._index, self._index_version = index, self.store.manifest.version

    def _save_index(self) -> None:
        directory = self.path / store_mod.INDEX
        name = f"v{self._index_version:08d}.{self._index.kind}"
        with store_mod.atomic_path(directory / name) as tmp:
            self._index.save(tmp)
        store_mod.atomic_write_json(directory / INDEX_META, {
            "version": self._index_version, "kind": self._index.kind, "file": name})
        for old in directory.iterdir():
            if old.name not in (name, INDEX_META) and not old.name.startswith("."):
                old.unlink(missing_ok=True)

    @property
    def index(self) -> KeyIndex:
        """The key index, loaded from its saved copy (brought up to date) or built."""
        if self._index is None:
            self.refresh()
            if self._load_saved_index():
                self._catch_up_index()
            else:
                self._build_index()
        return self._index

    def _catch_up_index(self) -> None:
        changed, deleted = self.store.read_entries_since(self._index_version)
        self._index.remove(self._index_ids(np.concatenate([changed, deleted])))
        if len(changed):
            self._index.add(*self._index_entries(changed))
        self._index_version = self.store.manifest.version

    # -- attaching to a model ------------------------------------------------------------
    def _check_model(self, model: nn.Module) -> None:
        cfg = self.config
        problems = []
        if getattr(model.config, "model_type", None) != cfg.model_type:
            problems.append(f"model type {model.config.model_type!r} != {cfg.model_type!r}")
        elif num_layers(model) != cfg.num_layers:
            problems.append(f"{num_layers(model)} layers != {cfg.num_layers}")
        elif ffn_dims(model, cfg.layer) != (cfg.d_key, cfg.d_value):
            problems.append(f"FFN dims {ffn_dims(model, cfg.layer)} != "
                            f"{(cfg.d_key, cfg.d_value)}")
        elif fingerprint(model, cfg.layer) != cfg.fingerprint:
            problems.append(f"the weights of layer {cfg.layer} differ (fingerprint "
                            f"{fingerprint(model, cfg.layer)} != {cfg.fingerprint})")
        if problems:
            raise ModelMismatchError(
                f"{self.path} was built for model {cfg.model_name!r}; this model does not "
                f"match: {problems[0]}")

    def _require_model(self, model, tokenizer):
        model = model if model is not None else self._model
        tokenizer = tokenizer if tokenizer is not None else self._tokenizer
        if model is None or tokenizer is None:
            raise ValueError("a model and tokenizer are needed: pass them, or attach(model, "
                             "tokenizer) first")
        return model, tokenizer

    def attach(self, model: nn.Module, tokenizer=None, *, force: bool = False,
               device: torch.device | str | None = None) -> nn.Module:
        """Hook this database into ``model`` (refused if the model does not match)."""
        if self._retrieval is not None:
            raise RuntimeError(f"{self.path} is already attached; detach() it first")
        if not force:
            self._check_model(model)
        projection = get_module(model, self.config.module)
        device = torch.device(device or next(model.parameters()).device)
        if device.type != self._device.split(":")[0]:
            self._device = str(device)  # an accelerator gets an index that searches there
            self._index = None
        self._residuals = ResidualCache(self.store, self.config.d_value, device,
                                        self._cache_bytes)
        self._retrieval = GatedRetrieval(self.index, self._residuals, self.config.gamma,
                                         self.config.anchor_token_id,
                                         self.config.compute.keys_per_fact)
        self._residuals.warm()
        self._retrieval.attach(model.base_model, projection)
        self._model = model
        if tokenizer is not None:
            self._tokenizer = tokenizer
        attached = getattr(model, "_ndb_attached", [])
        model._ndb_attached = [*attached, self]
        return model

    def detach(self) -> None:
        if self._retrieval is None:
            return
        self._retrieval.detach()
        self._retrieval = None
        if self._model is not None:
            self._model._ndb_attached = [d for d in getattr(self._model, "_ndb_attached", [])
                                         if d is not self]

    @property
    def retrieval(self) -> GatedRetrieval | None:
        """The live hook while attached (gate statistics, recording of scores)."""
        return self._retrieval

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the attached model without this database for a while."""
        if self._retrieval is None:
            yield
            return
        before = self._retrieval.enabled
        self._retrieval.enabled = False
        try:
            yield
        finally:
            self._retrieval.enabled = before

    @staticmethod
    @contextmanager
    def _all_hooks_disabled(model: nn.Module) -> Iterator[None]:
        """Keys and residuals must come from the unedited model, whatever is attached."""
        hooks = [db._retrieval for db in getattr(model, "_ndb_attached", []) if db._retrieval]
        before = [h.enabled for h in hooks]
        for h in hooks:
            h.enabled = False
        try:
            yield
        finally:
            for h, state in zip(hooks, before):
                h.enabled = state

    def __repr__(self) -> str:
        return (f"NeuralDB({str(self.path)!r}, facts={len(self)}, layer={self.config.layer}, "
                f"gamma={self.config.gamma})")
