"""A CLIP tokenizer made locally from a fixed small vocabulary, so nothing is ever fetched.

The vocabulary has CLIP's layout: the 256 byte symbols, the same with the end-of-word
marker ``</w>``, merged tokens, then ``<|startoftext|>`` and ``<|endoftext|>``. Merges
spell out a fixed list of common caption words, so short captions stay well inside 77
tokens; any other text still tokenizes (byte by byte).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

END_OF_WORD = "</w>"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77

_CAPTION_TEXT = (
    "a an the of in on at with and or by to for from photo picture painting drawing "
    "illustration portrait landscape close up full body style art artwork render sketch "
    "man woman person girl boy people child face hair eyes hand hands smile dress shirt "
    "hat cat dog bird horse fish flower tree trees grass forest mountain mountains sky "
    "cloud clouds sun moon star stars water sea ocean river lake beach city street house "
    "room car road light dark night day morning evening red green blue yellow orange "
    "purple pink black white gray grey brown gold silver colour color flat solid plain "
    "background simple detailed high quality best masterpiece blurry sharp bright soft "
    "long short big small old young sks ohwx tok spacesuit space cinematic lighting "
    "wearing standing sitting looking viewer outdoors indoors"
)
CAPTION_WORDS = tuple(_CAPTION_TEXT.split())


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map, which CLIP's BPE works on."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def build_vocabulary(words: Sequence[str] = CAPTION_WORDS) -> tuple[dict[str, int], list[str]]:
    """The fixed vocabulary and merge list for ``words`` (same on every machine)."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols]
    merges: list[str] = []
    known = set(tokens)
    for word in words:
        pieces = [*word[:-1], word[-1] + END_OF_WORD]
        merged = pieces[0]
        for piece in pieces[1:]:
            rule = f"{merged} {piece}"
            merged = merged + piece
            if merged not in known:
                merges.append(rule)
                tokens.append(merged)
                known.add(merged)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, merges


def write_tokenizer(folder: Path, words: Sequence[str] = CAPTION_WORDS) -> int:
    """Write vocab.json, merges.txt and the tokenizer config; return the vocabulary size."""
    vocab, merges = build_vocabulary(words)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    special["pad_token"] = EOS_TOKEN
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return len(vocab)


def special_token_ids(words: Sequence[str] = CAPTION_WORDS) -> tuple[int, int]:
    """(bos, eos) ids in the fixed vocabulary for ``words``."""
    vocab, _ = build_vocabulary(words)
    return vocab[BOS_TOKEN], vocab[EOS_TOKEN]
