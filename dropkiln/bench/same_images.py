"""Whether the daemon's image and the clean process's are the same picture with the same
A1111 infotext: what lets a bench say both sides did the same work."""

from __future__ import annotations

from pathlib import Path


def same_file(path: Path, other: Path) -> bool:
    """The same pixels (within ``PIXEL_TOLERANCE``) and the same A1111 ``parameters`` text."""
    from dropkiln.stages.generation.png_files import PARAMETERS_KEY, read_png_text

    same_text = read_png_text(path)[PARAMETERS_KEY] == read_png_text(other).get(PARAMETERS_KEY)
    return same_text and same_pixels(path, other)


PIXEL_TOLERANCE = 1
"""How far (in 8-bit levels) a pixel of the daemon's image may be from the clean process's.
The two may run torch on different thread counts (the daemon leaves a core to the rest of
itself; the script takes torch's default), and a different count sums in a different order:
the images differ by ~1e-6, which rounds a few pixels of a hundred thousand one level apart.
A different model, sampler, seed or prompt moves pixels by tens of levels."""


def same_pixels(path: Path, other: Path) -> bool:
    import numpy as np
    from PIL import Image

    with Image.open(path) as mine, Image.open(other) as theirs:
        a = np.asarray(mine.convert("RGB"), dtype=np.int16)
        b = np.asarray(theirs.convert("RGB"), dtype=np.int16)
    return a.shape == b.shape and int(np.abs(a - b).max()) <= PIXEL_TOLERANCE
