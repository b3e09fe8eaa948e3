"""`dropkiln serve`: an authenticated HTTP API over the same events and drop folders.

Never imports torch: it answers from the store and hands files to the daemon.
"""

from dropkiln.api.app import create_app
from dropkiln.api.auth import ensure_token, read_token, write_token
from dropkiln.api.errors import CODES, ApiError

__all__ = ["CODES", "ApiError", "create_app", "ensure_token", "read_token", "write_token"]
