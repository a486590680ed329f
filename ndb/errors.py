"""Errors a user can cause; the CLI prints them as one line and exits non-zero.

Everything else is a bug and keeps its traceback. Each class also derives from the built-in
type it replaced, so ``except ValueError`` in callers' code still catches it.
"""

from __future__ import annotations

import errno
import re


class NdbError(Exception):
    """Base of every error that is the user's input or environment, not a bug in ndb."""


class FactError(NdbError, ValueError):
    """A facts file or record that cannot be used."""


class ConfigError(NdbError, ValueError):
    """A setting or option value that cannot be used (gamma, layer, device, output path...)."""


class ModelError(NdbError, ValueError):
    """A model that cannot be found, loaded or edited."""


class ModelMismatchError(ModelError):
    """The model is not the one the database was built for."""


class StoreError(NdbError, RuntimeError):
    """A database directory that cannot be opened or written."""


class LockedError(StoreError):
    """Another process is writing the database."""


class DiskFullError(StoreError):
    """The disk (or quota) ran out while writing; the write was not committed."""


class DistributedError(StoreError):
    """A process of a distributed build failed (it says why); nothing was committed."""


class FactNotFoundError(NdbError, KeyError):
    """No fact with that id or subject."""

    def __str__(self) -> str:
        return str(self.args[0])


USER_ERRORS = (NdbError,)


def one_line(err: BaseException | str) -> str:
    """An error's message on one line, as ndb shows it (a KeyError's without quotes)."""
    message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(message.split())

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_REFUSED = {errno.EACCES, errno.EPERM, errno.EROFS}


_HDF5_ERRNO = re.compile(r"\berrno = (\d+)")


def _errno(err: BaseException) -> int | None:
    """The errno of an OS error; HDF5 reports a write that fails while closing a file as a
    RuntimeError that carries the errno only in its message."""
    if isinstance(err, OSError):
        return err.errno
    match = _HDF5_ERRNO.search(str(err)) if isinstance(err, RuntimeError) else None
    return int(match.group(1)) if match else None


def environment_error(err: BaseException) -> NdbError | None:
    """The ndb error for an OS refusal behind ``err`` (disk full, permission denied,
    read-only file system), which no code path of ndb can be blamed for; else None.

    HDF5 reports a full disk as an OSError with the errno set, sometimes as the context of
    a later error, so the whole chain is searched."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if _errno(err) in _DISK_FULL:
            return DiskFullError("the disk is full (no space left on device); nothing more "
                                 "was written, the database keeps its last committed state")
        if isinstance(err, OSError) and err.errno in _REFUSED:
            where = f"{err.filename}: " if err.filename else ""
            return StoreError(f"{where}{err.strerror or 'permission denied'}")
        err = err.__cause__ or err.__context__
    return None
