"""`dropkiln serve`: an authenticated HTTP API over the same events and drop folders.

Never imports torch: it answers from the store and hands files to the daemon. The web
stack is imported by ``dropkiln.api.app`` only, so the token commands start quickly.
"""
