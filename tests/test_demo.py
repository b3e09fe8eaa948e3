"""``dropkiln demo`` end to end: the LoRA it trains teaches tiny-shapes a new word, visibly."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from dropkiln.demo import CONCEPT_COLOUR, CONCEPT_SHAPE, SEEDS, run_demo
from dropkiln.demo_story import concept_hits, rendered_images


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One demo run for the tests below: its home and what it printed."""
    home = tmp_path_factory.mktemp("demo") / "demo"
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        # the suite pins tiny-sdxl through the environment; the demo is about tiny-shapes
        patch.delenv("DROPKILN_MODEL", raising=False)
        assert run_demo(home, out=out) == 0, out.getvalue()
    return home, out.getvalue()


def _concept_hits(home: Path) -> tuple[int, int]:
    """(images the detector reads as the concept with the LoRA, without it)."""
    images = home / "outputs" / "images"
    before, after = rendered_images(images / "before"), rendered_images(images / "after")
    assert len(before) == len(after) == SEEDS
    return (
        concept_hits(after, CONCEPT_COLOUR, CONCEPT_SHAPE),
        concept_hits(before, CONCEPT_COLOUR, CONCEPT_SHAPE),
    )


@pytest.mark.slow
def test_demo_lora_teaches_the_new_word(demo_run: tuple[Path, str]) -> None:
    home, text = demo_run
    with_lora, without = _concept_hits(home)
    print(f"{CONCEPT_COLOUR} {CONCEPT_SHAPE} with the LoRA {with_lora}/{SEEDS}, without {without}")
    # issue 17: without the LoRA the detector finds the new word in at most 10% of the seeds
    assert without <= 0.1 * SEEDS
    images = home / "outputs" / "images"
    before, after = rendered_images(images / "before"), rendered_images(images / "after")
    changed = 0
    for first, second in zip(before, after, strict=True):
        with Image.open(first) as a, Image.open(second) as b:
            changed += a.tobytes() != b.tobytes()
    assert changed == SEEDS, "the LoRA must change every image of its word"
    assert f"images with the LoRA, {without}/{SEEDS} without" in text
    picture = home / "outputs" / "before-after.png"
    assert f"before/after: {picture}" in text
    with Image.open(picture) as image:
        assert image.width >= SEEDS * 64
    for label in ("LoRA:", "loss curve:", "video:"):
        assert label in text


@pytest.mark.slow
def test_demo_lora_draws_the_new_word_on_most_seeds(demo_run: tuple[Path, str]) -> None:
    # issue 17: with the LoRA the detector finds the new word in at least 80% of the seeds
    with_lora, _ = _concept_hits(demo_run[0])
    assert with_lora >= 0.8 * SEEDS, with_lora


@pytest.mark.slow
@pytest.mark.full
def test_demo_full_gives_one_contact_sheet_per_feature(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dropkiln.demo_features import FEATURES
    from dropkiln.stages.generate import CONTACT_SHEET

    monkeypatch.delenv("DROPKILN_MODEL", raising=False)
    out = io.StringIO()
    assert run_demo(tmp_path / "demo", out=out, full=True) == 0, out.getvalue()
    images = tmp_path / "demo" / "outputs" / "images"
    for feature in FEATURES:
        with Image.open(images / feature / CONTACT_SHEET) as sheet:
            assert sheet.width >= 64, feature
    assert list((tmp_path / "demo" / "outputs").rglob("*.mp4")), "the slideshow's video"


def test_before_after_titles_wrap_inside_a_narrow_picture(tmp_path: Path) -> None:
    # Two seeds make a 192-pixel-wide picture; the prompt line is longer than that and
    # used to run off its right edge, cut mid-word. Wrapped, no title pixel reaches the edge.
    from dropkiln.demo import CONCEPT_PROMPT
    from dropkiln.demo_story import before_after_picture

    cells = []
    for number in range(2):
        cells.append(tmp_path / f"{number}.png")
        Image.new("RGB", (64, 64), (24, 24, 24)).save(cells[-1])
    picture = before_after_picture(
        [("tiny-shapes", cells), ("tiny-shapes + the zorp LoRA, weight 1.0", cells)],
        CONCEPT_PROMPT,
        tmp_path / "before-after.png",
    )
    with Image.open(picture) as image:
        edge = image.convert("L").crop((image.width - 2, 0, image.width, image.height))
        assert edge.getextrema()[1] <= 24, "a title runs past the picture's right edge"
        assert image.height > 2 * 96 + 3 * 14  # the header took more than one line


def test_demo_dataset_shows_its_word_on_every_picture(tmp_path: Path) -> None:
    # The dataset is what the LoRA learns the word from: the detector must read each of its
    # pictures as the concept (a black circle on a black background is no picture of it).
    from dropkiln.demo import CONCEPT, write_sample_dataset
    from dropkiln.stages.models.shapes_detect import detect

    count = write_sample_dataset(tmp_path / CONCEPT)
    pictures = sorted((tmp_path / CONCEPT).glob("*.png"))
    assert len(pictures) == count
    for picture in pictures:
        with Image.open(picture) as image:
            found = detect(image)
        assert found.matches(colour=CONCEPT_COLOUR, shape=CONCEPT_SHAPE), (picture.name, found)
        caption = picture.with_suffix(".txt").read_text()
        assert f" {CONCEPT} {CONCEPT_SHAPE} " in caption, caption
