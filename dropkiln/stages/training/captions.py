"""Caption augmentation and per-tag loss weights; captions are comma-separated tags."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

import numpy as np

from dropkiln.options import TrainSettings


def split_tags(caption: str) -> list[str]:
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def join_tags(tags: Iterable[str]) -> str:
    return ", ".join(tags)


def needs_text_encoder(options: TrainSettings) -> bool:
    """True when captions vary per step (so they are encoded on the fly, not cached)."""
    return bool(options.shuffle_tags or options.tag_dropout > 0 or options.train_text_encoder)


def augment_caption(caption: str, rng: np.random.Generator, options: TrainSettings) -> str:
    """The caption as one training step sees it.

    Caption dropout replaces the whole caption with the empty one (what unconditional
    guidance uses); the first ``keep_tokens`` tags stay in place, the rest may be dropped
    and shuffled. ``rng`` is a numpy Generator.
    """
    if options.caption_dropout > 0 and rng.random() < options.caption_dropout:
        return ""
    if not (options.shuffle_tags or options.tag_dropout > 0):
        return caption
    tags = split_tags(caption)
    kept, rest = tags[: options.keep_tokens], tags[options.keep_tokens :]
    if options.tag_dropout > 0:
        draws = rng.random(len(rest))
        rest = [tag for tag, draw in zip(rest, draws, strict=True) if draw >= options.tag_dropout]
    if options.shuffle_tags and len(rest) > 1:
        rest = [rest[i] for i in rng.permutation(len(rest))]
    return join_tags(kept + rest)


def tag_loss_weight(caption: str, tag_weights: Mapping[str, float]) -> float:
    """An image's loss weight: the product of the weights of its tags (unlisted tags: 1)."""
    if not tag_weights:
        return 1.0
    lowered = {tag.lower(): weight for tag, weight in tag_weights.items()}
    weight = 1.0
    for tag in {t.lower() for t in split_tags(caption)}:
        weight *= lowered.get(tag, 1.0)
    return weight


def tag_frequency(captions: Iterable[str]) -> dict[str, int]:
    """How many captions carry each tag (for the LoRA's ss_tag_frequency metadata)."""
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(set(split_tags(caption)))
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
