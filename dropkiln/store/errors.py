"""What the store raises. Standard library only: every reader imports it."""


class StoreError(Exception):
    """The database cannot be used as asked; the message says why."""


class ConcurrencyError(StoreError):
    """An append expected a stream version that another writer already took."""
