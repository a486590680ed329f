"""Errors a user can cause; the CLI prints them as one line and exits non-zero."""


class FactError(ValueError):
    """A facts file or record that cannot be used."""


class ModelError(ValueError):
    """A model that cannot be found, loaded or edited."""


class ModelMismatchError(ModelError):
    """The model is not the one the database was built for."""


class StoreError(RuntimeError):
    """A database directory that cannot be opened or written."""


class LockedError(StoreError):
    """Another process is writing the database."""


class FactNotFoundError(KeyError):
    """No fact with that id or subject."""

    def __str__(self) -> str:
        return str(self.args[0])


USER_ERRORS = (FactError, ModelError, StoreError, FactNotFoundError)
