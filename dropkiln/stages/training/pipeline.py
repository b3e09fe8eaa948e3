"""What training uses of a warm Stable Diffusion (XL) pipeline, as a type.

diffusers registers a pipeline's components at run time, so its classes do not declare
them; this protocol names the ones training touches. SD 1.5 pipelines have no second text
encoder, so ``text_encoder_2`` is not part of it.

The classes come from their own modules: diffusers' and transformers' package roots also
export stand-in classes for installs without torch, which type checkers would pick.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from transformers.modeling_utils import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase


class TrainingPipeline(Protocol):
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    scheduler: ConfigMixin
    """The pipeline's sampler; training builds its DDPM schedule from its config."""

    @property
    def components(self) -> dict[str, Any]: ...

    @property
    def device(self) -> torch.device: ...

    # The pipeline's own call (validation images); its output type differs per pipeline.
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
