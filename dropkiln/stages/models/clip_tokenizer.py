"""The real CLIP tokenizers, built on this machine from the BPE file open-clip-torch ships.

OpenAI's CLIP and OpenCLIP tokenize with one byte-pair vocabulary,
``bpe_simple_vocab_16e6.txt.gz``. The published ``vocab.json``/``merges.txt`` of
``openai/clip-vit-large-patch14`` are that file laid out the way CLIP's own
``SimpleTokenizer`` lays it out: the 256 byte symbols, the same with ``</w>``, one token
per merge rule (the first 48,894 rules), then ``<|startoftext|>`` and ``<|endoftext|>``:
49,408 tokens. Building them here means a single-file checkpoint needs nothing fetched.

open-clip-torch is installed without its dependencies (its torchvision pin does not fit
our torch build), so the package is never imported: its file is found through its
installed-distribution record.
"""

from __future__ import annotations

import gzip
import importlib.metadata
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dropkiln.stages.base import StageError
from dropkiln.stages.models.offline import enforce_offline
from dropkiln.stages.models.tokenizer import BOS_TOKEN, END_OF_WORD, EOS_TOKEN, bytes_to_unicode

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

VOCAB_DISTRIBUTION = "open-clip-torch"
VOCAB_FILE = "open_clip/bpe_simple_vocab_16e6.txt.gz"
MERGE_COUNT = 49152 - 256 - 2
"""CLIP keeps this many merge rules: a 49,408-token vocabulary (256 bytes ×2 + merges + 2)."""
MAX_LENGTH = 77

PadStyle = Literal["endoftext", "zero"]
"""How a tokenizer pads: OpenAI CLIP ViT-L with ``<|endoftext|>``; OpenCLIP ViT-bigG (SDXL's
second tokenizer) with ``!``, id 0, because open_clip's own tokenizer pads with zeros."""
PAD_TOKENS: dict[PadStyle, str] = {"endoftext": EOS_TOKEN, "zero": "!"}


def bpe_vocabulary_file() -> Path:
    """Where the installed open-clip-torch keeps CLIP's BPE file."""
    try:
        dist = importlib.metadata.distribution(VOCAB_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise StageError(
            "single-file checkpoints need CLIP's BPE vocabulary from the open-clip-torch package: "
            "pip install --no-deps -c constraints.txt open-clip-torch"
        ) from None
    path = Path(str(dist.locate_file(VOCAB_FILE)))
    if not path.is_file():
        raise StageError(f"open-clip-torch is installed but {VOCAB_FILE} is missing from it")
    return path


@cache
def clip_vocabulary() -> tuple[dict[str, int], tuple[tuple[str, ...], ...]]:
    """CLIP's token → id map and merge rules, as CLIP's SimpleTokenizer derives them."""
    lines = gzip.decompress(bpe_vocabulary_file().read_bytes()).decode("utf-8").split("\n")
    # The first line is a version header; only the first MERGE_COUNT rules are used.
    merges = tuple(tuple(line.split()) for line in lines[1 : MERGE_COUNT + 1])
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols]
    tokens += ["".join(pair) for pair in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, merges


def clip_tokenizer(pad: PadStyle = "endoftext") -> CLIPTokenizer:
    """A transformers CLIPTokenizer with CLIP's vocabulary, 77 tokens long, padding as ``pad``."""
    enforce_offline()
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary()
    pairs: list[Any] = list(merges)  # the tokenizers library takes (left, right) pairs
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=pairs,
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKENS[pad],
        model_max_length=MAX_LENGTH,
    )
