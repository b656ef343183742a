"""Procedural fine-grained scenes with exact evidence boxes (the toy world).

World "M" of the toy-world notes is the default: a 168 x 168 white canvas holding 3-5
non-overlapping filled shapes of 20-28 px whose centres are at least 36 px apart. Exactly one
object has the asked shape (the distractors take the other shapes) and that target is drawn with
a 3-px black outline, a patch-local cue that makes full-image localisation learnable by a ~1 M
parameter model within a few hundred steps. The question is ``What color is the {shape}?`` and the
answer is a sentence, ``The {shape} is {colour}.``, so a response has several tokens and sampling
matters. Red is not an object colour: it is reserved for the student's evidence box.

:func:`view_input` gives the four views of a scene (``full``, ``crop``, ``boxed_full``,
``boxed_crop``), all built by :mod:`vopd.views` with :data:`TOY_VIEW`.

Every scene is a pure function of its seed: scene ``i`` of ``make_dataset(n, seed)`` depends only
on ``(seed, i)``, so a longer dataset extends a shorter one.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vopd.config import ViewConfig
from vopd.images import load_image
from vopd.records import Box, Sample, write_records
from vopd.views import prompt_text, student_view, teacher_view

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "blue": (30, 90, 230),
    "green": (40, 170, 60),
    "yellow": (240, 210, 30),
    "purple": (140, 60, 190),
    "orange": (250, 140, 20),
    "cyan": (30, 200, 220),
}
BACKGROUND = (255, 255, 255)
OUTLINE_COLOUR = (0, 0, 0)
#: Fill of every object in a world with ``mark_size`` > 0 (world "R"): the colour is in the mark only.
NEUTRAL_FILL = (150, 150, 150)
CATEGORY = "toy/color"
#: Seed of the held-out evaluation set (the demo's 500 scenes and the base's reported numbers).
HELDOUT_SEED = 123
#: Seed of the validation scenes evaluated during base pretraining (never the held-out set).
VALIDATION_SEED = 7

# Teacher/student views that reproduce the toy-world crop: the evidence box (the target bbox,
# 20-28 px) grows by `context` on each side and to at least `min_side`, giving a 56 x 56 window
# centred on the target and clamped to the canvas, resized 2x to 112 px (16 image tokens). The
# student's red box is a 2-px line 3-4 px outside the target bbox (box_margin 2 + width 2).
TOY_VIEW = ViewConfig(context=0.0, min_side=56, zoom=2.0, box_width=2, box_margin=2)

#: The views reported by default: clean full, clean crop, boxed full + hint.
VIEWS: tuple[str, ...] = ("full", "crop", "boxed_full")
#: Every toy view; ``boxed_crop`` is used in base pretraining.
ALL_VIEWS: tuple[str, ...] = ("full", "crop", "boxed_full", "boxed_crop")


@dataclasses.dataclass(frozen=True)
class SceneConfig:
    """Knobs of the scene generator; the defaults are world "M".

    Attributes:
        size: canvas side in pixels (168 -> 12 x 12 patches of 14 px -> 36 image tokens).
        min_objects: fewest objects per scene (target included).
        max_objects: most objects per scene.
        min_object_size: smallest object side in pixels (sides are even: 20, 22, ..., 28).
        max_object_size: largest object side in pixels.
        min_centre_distance: smallest distance between two object centres in pixels.
        outline: draw the target with a black outline (world "M"); False gives the harder
            shape-only world "S", where the target differs from the distractors by shape alone.
        outline_width: outline thickness in pixels.
        shapes: the shapes a target or distractor can take (at least two).
        colours: object colour names, keys of ``COLOURS`` (never red: red is the evidence box).
        mark_size: 0 (world "M"): objects are filled with their colour. > 0 (world "R", the
            resolution-gap world): objects are filled grey (``NEUTRAL_FILL``) and the colour
            is only in a centred square mark of this side in pixels, so at 1x it covers a small
            part of a 14 px patch and in the 2x crop four times as many pixels. Must be smaller
            than half of ``min_object_size`` (it sits inside every shape, triangles included).
    """

    size: int = 168
    min_objects: int = 3
    max_objects: int = 5
    min_object_size: int = 20
    max_object_size: int = 28
    min_centre_distance: float = 36.0
    outline: bool = True
    outline_width: int = 3
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    mark_size: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"SceneConfig: need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}"
            )
        if (
            not 4 <= self.min_object_size <= self.max_object_size < self.size
            or (self.min_object_size + 1) // 2 > self.max_object_size // 2
        ):
            raise ValueError(
                f"SceneConfig: need 4 <= min_object_size <= max_object_size < size with an even "
                f"size in between, got "
                f"{self.min_object_size}, {self.max_object_size}, {self.size}"
            )
        if self.min_centre_distance <= 0:
            raise ValueError(f"SceneConfig: min_centre_distance must be > 0, got {self.min_centre_distance}")
        unknown = [s for s in self.shapes if s not in SHAPES]
        if unknown or len(set(self.shapes)) < 2:
            raise ValueError(f"SceneConfig.shapes: need >= 2 distinct shapes from {SHAPES}, got {self.shapes}")
        if not 0 <= self.mark_size < self.min_object_size // 2:
            raise ValueError(
                f"SceneConfig.mark_size: need 0 <= mark_size < min_object_size / 2 (inside every "
                f"shape), got {self.mark_size} with min_object_size {self.min_object_size}"
            )
        bad = [c for c in self.colours if c not in COLOURS]
        if bad or not self.colours:
            raise ValueError(f"SceneConfig.colours: unknown colour(s) {bad}; choose from {tuple(COLOURS)}")


@dataclasses.dataclass(frozen=True)
class ToyObject:
    """One drawn object: shape, colour name, centre and side in pixels."""

    shape: str
    colour: str
    cx: int
    cy: int
    side: int

    def corners(self) -> tuple[int, int, int, int]:
        """Inclusive-exclusive square ``(x0, y0, x1, y1)`` the shape is inscribed in."""
        half = self.side // 2
        return self.cx - half, self.cy - half, self.cx - half + self.side, self.cy - half + self.side


#: Named worlds (the data spec ``toyworld:N:SEED:WORLD``, ``vopd demo --world``). "M" is the
#: shipped world (the default everywhere); "R" is the resolution-gap world of docs/proposals.md:
#: the target keeps M's outline (easy to find) but its colour is only a 4 px mark (hard to read at 1x).
WORLDS: dict[str, SceneConfig] = {
    "M": SceneConfig(),
    "R": SceneConfig(mark_size=4),
}


def world_config(name: str) -> SceneConfig:
    """The ``SceneConfig`` of a named world (``WORLDS``); a clear error for an unknown name."""
    try:
        return WORLDS[name]
    except KeyError:
        raise ValueError(f"unknown toy world {name!r}; choose from {sorted(WORLDS)}") from None


def question_text(shape: str) -> str:
    """The toy question for a target shape."""
    return f"What color is the {shape}?"


def answer_text(shape: str, colour: str) -> str:
    """The toy answer sentence (several tokens: the colour is not the first one)."""
    return f"The {shape} is {colour}."


def _apart(cx: int, cy: int, side: int, x: int, y: int, s: int, cfg: SceneConfig) -> bool:
    """Centres far enough apart and the two bounding squares separated by >= 2 px."""
    gap = (side + s) / 2 + 2
    far = math.hypot(cx - x, cy - y) >= cfg.min_centre_distance
    return far and (abs(cx - x) >= gap or abs(cy - y) >= gap)


def _place_objects(rng: np.random.Generator, cfg: SceneConfig, count: int) -> list[tuple[int, int, int]]:
    """Rejection-sample ``count`` (cx, cy, side) triples that respect the spacing rule."""
    for _ in range(200):
        placed: list[tuple[int, int, int]] = []
        for _ in range(400):
            # Even sides put the box centre on a whole pixel, so the crop window is exactly
            # min_side wide (an odd box would round outwards to min_side + 1).
            side = 2 * int(rng.integers((cfg.min_object_size + 1) // 2, cfg.max_object_size // 2 + 1))
            lo, hi = side // 2 + 2, cfg.size - (side - side // 2) - 2
            cx, cy = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
            if all(_apart(cx, cy, side, x, y, s, cfg) for x, y, s in placed):
                placed.append((cx, cy, side))
                if len(placed) == count:
                    return placed
    raise ValueError(
        f"SceneConfig: could not place {count} objects of <= {cfg.max_object_size} px at "
        f"{cfg.min_centre_distance} px spacing on a {cfg.size} px canvas; lower max_objects"
    )


def _draw(draw: ImageDraw.ImageDraw, obj: ToyObject, fill: Any, outline: Any, width: int) -> None:
    """Draw one object; PIL keeps the outline inside the object's square."""
    x0, y0, x1, y1 = obj.corners()
    # PIL's ellipse/rectangle boxes are inclusive of the last pixel: x1 - 1 keeps side px exactly.
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill, outline=outline, width=width)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill, outline=outline, width=width)
    elif obj.shape == "triangle":
        points = [(obj.cx, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)]
        draw.polygon(points, fill=fill, outline=outline, width=width)
    else:  # pragma: no cover - SceneConfig validates shapes
        raise ValueError(f"unknown shape {obj.shape!r}")


def render(objects: list[ToyObject], target: int, cfg: SceneConfig) -> tuple[Image.Image, Box]:
    """Draw the scene and return it with the target's exact pixel bbox (x1, y1 exclusive)."""
    image = Image.new("RGB", (cfg.size, cfg.size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for i, obj in enumerate(objects):
        marked = cfg.outline and i == target
        _draw(
            draw,
            obj,
            fill=NEUTRAL_FILL if cfg.mark_size else COLOURS[obj.colour],
            outline=OUTLINE_COLOUR if marked else None,
            width=cfg.outline_width if marked else 0,
        )
        if cfg.mark_size:
            # The answer-bearing detail: a small square of the object's colour at its centre
            # (the centre lies inside every shape: a triangle is side/2 wide at half height).
            x0, y0 = obj.cx - cfg.mark_size // 2, obj.cy - cfg.mark_size // 2
            draw.rectangle((x0, y0, x0 + cfg.mark_size - 1, y0 + cfg.mark_size - 1), fill=COLOURS[obj.colour])
    # The box comes from the target's own pixels (drawn alone on a mask), not from its nominal
    # square, so it is exact for every shape.
    mask = Image.new("L", (cfg.size, cfg.size), 0)
    _draw(ImageDraw.Draw(mask), objects[target], fill=255, outline=255, width=cfg.outline_width if cfg.outline else 0)
    x0, y0, x1, y1 = mask.getbbox()
    return image, Box(float(x0), float(y0), float(x1), float(y1))


def make_scene(
    rng: np.random.Generator, cfg: SceneConfig = SceneConfig(), *, scene_id: str = "toy-0"
) -> tuple[Image.Image, Sample]:
    """Draw one scene from ``rng`` and return the image and its ``Sample``.

    The sample's ``boxes`` hold the target's exact pixel bbox; ``meta`` holds the target shape and
    colour and every object (shape, colour, box) for diagnostics.
    """
    count = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    target_shape = str(rng.choice(cfg.shapes))
    others = [s for s in cfg.shapes if s != target_shape]
    shapes = [target_shape] + [str(rng.choice(others)) for _ in range(count - 1)]
    colours = [str(rng.choice(cfg.colours)) for _ in range(count)]
    spots = _place_objects(rng, cfg, count)
    objects = [ToyObject(s, c, x, y, side) for s, c, (x, y, side) in zip(shapes, colours, spots)]
    # The target's index in the draw order is random too, so "first drawn" is no cue.
    order = rng.permutation(count)
    objects = [objects[i] for i in order]
    target = int(np.flatnonzero(order == 0)[0])
    image, box = render(objects, target, cfg)
    colour = objects[target].colour
    sample = Sample(
        id=scene_id,
        image=image,
        question=question_text(target_shape),
        options=None,
        answer=answer_text(target_shape, colour),
        boxes=[box],
        teacher_image=None,
        category=CATEGORY,
        meta={
            "shape": target_shape,
            "colour": colour,
            "objects": [{"shape": o.shape, "colour": o.colour, "box": list(o.corners())} for o in objects],
            "target_index": target,
        },
    )
    return image, sample


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of scene ``index`` of the dataset with ``seed`` (independent of its size)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def make_dataset(n: int, seed: int, cfg: SceneConfig = SceneConfig()) -> list[Sample]:
    """``n`` scenes, deterministic from ``seed``; ids are ``toy-{seed}-{i:05d}``."""
    if n < 0:
        raise ValueError(f"make_dataset: n must be >= 0, got {n}")
    if seed < 0:  # numpy's generator refuses it deep inside with no name for the setting
        raise ValueError(f"the toy world's seed (--seed) must be >= 0, got {seed}")
    return [make_scene(scene_rng(seed, i), cfg, scene_id=f"toy-{seed}-{i:05d}")[1] for i in range(n)]


def write_dataset(
    out_dir: str | Path, n: int, seed: int, cfg: SceneConfig = SceneConfig(), *, overwrite: bool = False
) -> Path:
    """Write ``n`` scenes to ``out_dir`` in the project's record format; returns the records path.

    Backs ``vopd data toyworld --n 500 --seed 123 --out DIR``. A ``records.jsonl`` or ``images/``
    already in ``out_dir`` that this command did not write is refused unless ``overwrite``
    (`vopd.outputs.claim_output`).
    """
    from vopd.outputs import claim_output

    if seed < 0:  # before claiming the folder: a refused run leaves nothing behind
        raise ValueError(f"the toy world's seed (--seed) must be >= 0, got {seed}")
    out = Path(out_dir)
    # The raw value: Path("") is ".", so claim_output could not refuse --out '' (the current folder).
    claim_output(out_dir, command="vopd data toyworld", owned=("records.jsonl", "images"), overwrite=overwrite)
    path = out / "records.jsonl"
    write_records(make_dataset(n, seed, cfg), path)
    return path


def view_input(sample: Sample, view: str, cfg: ViewConfig = TOY_VIEW) -> tuple[Image.Image, str]:
    """The (image, prompt text) a model sees for one view of a sample (see the module doc)."""
    image = load_image(sample.image, where=f"sample {sample.id!r}")
    boxed_cfg = dataclasses.replace(cfg, draw_box=True)
    if view == "full":
        return student_view(image, sample.boxes, dataclasses.replace(cfg, draw_box=False)), prompt_text(
            sample, hint=False
        )
    if view == "crop":
        return teacher_view(image, sample.boxes, cfg), prompt_text(sample, hint=False)
    if view == "boxed_full":
        return student_view(image, sample.boxes, boxed_cfg), prompt_text(sample, hint=True)
    if view == "boxed_crop":
        # The region is computed from the boxes, so this is the clean crop's window with the
        # red line drawn in (the line sits 3-4 px outside the target, inside the window).
        boxed = student_view(image, sample.boxes, boxed_cfg)
        return teacher_view(boxed, sample.boxes, cfg), prompt_text(sample, hint=True)
    raise ValueError(f"unknown toy view {view!r}; choose from {ALL_VIEWS}")
