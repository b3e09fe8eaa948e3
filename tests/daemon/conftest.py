"""Every test here ends with `store check` on the databases it made."""

from tests.storecheck import store_checked_after

__all__ = ["store_checked_after"]
