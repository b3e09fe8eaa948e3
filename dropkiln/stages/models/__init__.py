"""Models: the tiny built-ins, local diffusers folders and single files, warm pipelines.

Importing this package sets the Hugging Face offline switches before diffusers or
transformers are imported; it does not import torch.
"""

from dropkiln.stages.models.offline import enforce_offline

enforce_offline()

from dropkiln.stages.models.hashes import (  # noqa: E402
    CheckpointHashes,
    checkpoint_files,
    checkpoint_hashes,
)
from dropkiln.stages.models.loading import load_pipeline, pipeline_bytes, pipeline_class  # noqa: E402
from dropkiln.stages.models.refs import (  # noqa: E402
    ModelRef,
    checkpoint_kind,
    resolve_model,
)
from dropkiln.stages.models.single_file import (  # noqa: E402
    SHIPPED_CONFIGS,
    CheckpointFamily,
    ModelKind,
    checkpoint_family,
)
from dropkiln.stages.models.tiny import (  # noqa: E402
    TINY_NAMES,
    TinyName,
    ensure_tiny_model,
    tiny_components,
    weights_checksum,
)
from dropkiln.stages.models.warm import (  # noqa: E402
    PipelineCache,
    configure_shared_pipelines,
    shared_pipelines,
)

__all__ = [
    "SHIPPED_CONFIGS",
    "TINY_NAMES",
    "CheckpointFamily",
    "CheckpointHashes",
    "ModelKind",
    "ModelRef",
    "PipelineCache",
    "TinyName",
    "checkpoint_family",
    "checkpoint_files",
    "checkpoint_hashes",
    "checkpoint_kind",
    "configure_shared_pipelines",
    "enforce_offline",
    "ensure_tiny_model",
    "load_pipeline",
    "pipeline_bytes",
    "pipeline_class",
    "resolve_model",
    "shared_pipelines",
    "tiny_components",
    "weights_checksum",
]
