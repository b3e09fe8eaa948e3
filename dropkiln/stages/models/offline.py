"""Keep the Hugging Face libraries off the network: weights come from local files only."""

from __future__ import annotations

import os

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def enforce_offline() -> None:
    """Set the offline switches; huggingface_hub reads them when it is first imported."""
    for name in OFFLINE_VARIABLES:
        os.environ.setdefault(name, "1")
    # Telemetry pings are network calls too.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DISABLE_TELEMETRY", "1")


def quiet_libraries() -> None:
    """No progress bars or info chatter from diffusers/transformers in the daemon's logs."""
    enforce_offline()
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
