"""dropkiln: a drop-folder daemon for one GPU box."""

__version__ = "0.1.0"
