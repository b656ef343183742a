"""vopd.views: evidence region, teacher crop, student view, prompt text."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from vopd.config import ViewConfig
from vopd.records import Box, RecordError, Sample
from vopd.views import (
    HINT,
    INSTRUCTION,
    evidence_region,
    make_views,
    prompt_text,
    student_view,
    teacher_view,
    zoomed_size,
)


def _noise(width=200, height=120, seed=0, red=True):
    """A seeded random RGB image; with ``red=False`` the red channel is 0 everywhere."""
    arr = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    if not red:
        arr[..., 0] = 0
    return Image.fromarray(arr), arr


def _cfg(**kw):
    return ViewConfig(**{"context": 0.0, "min_side": 1, "zoom": 1.0, **kw})


# --------------------------------------------------------------------------- config --


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        ({"zoom": 0}, "zoom"),
        ({"zoom": float("nan")}, "zoom"),
        ({"context": -0.1}, "context"),
        ({"min_side": 0}, "min_side"),
        ({"max_pixels": 0}, "max_pixels"),
        ({"box_width": -1}, "box_width"),
        ({"box_margin": -2}, "box_margin"),
        ({"box_color": (255, 0)}, "box_color"),
        ({"box_color": (256, 0, 0)}, "box_color"),
    ],
)
def test_config_rejects_bad_values(kw, name):
    with pytest.raises(ValueError, match=f"views.{name}.* must be"):
        ViewConfig(**kw)


def test_config_defaults_and_list_colour():
    cfg = ViewConfig(box_color=[0, 255, 0])
    assert cfg.box_color == (0, 255, 0)
    d = ViewConfig()
    assert (d.context, d.min_side, d.zoom, d.max_pixels, d.draw_box, d.hint) == (0.5, 56, 2.0, 1_003_520, False, False)


# ------------------------------------------------------------------- evidence_region --


def test_region_context_padding():
    # 20x20 box, context 0.5 -> 10 px on each side.
    assert evidence_region([Box(40, 40, 60, 60)], (200, 200), _cfg(context=0.5)) == Box(30, 30, 70, 70)
    # Padding is relative to each side: a 40x10 box gets 20 and 5 px.
    assert evidence_region([Box(40, 40, 80, 50)], (200, 200), _cfg(context=0.5)) == Box(20, 35, 100, 55)


def test_region_union_of_boxes():
    boxes = [Box(10, 10, 20, 20), Box(50, 40, 60, 80), Box(30, 5, 35, 9)]
    assert evidence_region(boxes, (200, 200), _cfg()) == Box(10, 5, 60, 80)


def test_region_min_side_grows_around_centre():
    assert evidence_region([Box(100, 100, 104, 104)], (200, 200), _cfg(min_side=56)) == Box(74, 74, 130, 130)


def test_region_shifted_inside_at_borders():
    cfg = _cfg(min_side=56)
    assert evidence_region([Box(0, 0, 10, 10)], (200, 200), cfg) == Box(0, 0, 56, 56)
    assert evidence_region([Box(195, 190, 200, 200)], (200, 200), cfg) == Box(144, 144, 200, 200)
    # Padding that crosses a border shifts the crop, keeping its size and the evidence.
    assert evidence_region([Box(2, 50, 22, 70)], (200, 200), _cfg(context=0.5)) == Box(0, 40, 40, 80)
    # Larger than the image on one axis: clamped to that axis only.
    assert evidence_region([Box(10, 10, 20, 20)], (200, 40), _cfg(min_side=64)) == Box(0, 0, 64, 40)
    # A box partly outside is clipped before padding.
    assert evidence_region([Box(-50, 10, 10, 20)], (200, 200), _cfg()) == Box(0, 10, 10, 20)


def test_region_rounds_outward_to_integers():
    region = evidence_region([Box(10.2, 10.7, 20.5, 30.1)], (100, 100), _cfg())
    assert region == Box(10, 10, 21, 31)
    assert all(float(v).is_integer() for v in region.as_list())


def test_region_errors():
    with pytest.raises(ValueError, match="at least one box"):
        evidence_region([], (100, 100), _cfg())
    with pytest.raises(ValueError, match="outside the 100x100 image"):
        evidence_region([Box(120, 10, 130, 20)], (100, 100), _cfg())


# ---------------------------------------------------------------------- teacher view --


def test_teacher_crop_is_the_clean_region():
    image, arr = _noise()
    crop = teacher_view(image, [Box(30, 20, 70, 50)], _cfg())
    np.testing.assert_array_equal(np.asarray(crop), arr[20:50, 30:70])


def test_teacher_zoom_keeps_block_colours():
    # 8x8 blocks of constant colour: bicubic 2x leaves each block's interior exact.
    blocks = np.random.default_rng(3).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    arr = np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8))
    crop = teacher_view(Image.fromarray(arr), [Box(16, 8, 48, 40)], _cfg(zoom=2.0))
    assert crop.size == (64, 64)
    out = np.asarray(crop)
    for by in range(4):
        for bx in range(4):
            np.testing.assert_array_equal(out[by * 16 + 8, bx * 16 + 8], blocks[1 + by, 2 + bx])


def test_zoom_pixel_budget():
    assert zoomed_size((100, 50), ViewConfig(zoom=2.0)) == (200, 100)
    # 100x100 at zoom 2 wants 40,000 px; the budget of 10,000 caps the zoom at 1.
    assert zoomed_size((100, 100), ViewConfig(zoom=2.0, max_pixels=10_000)) == (100, 100)
    # The budget can shrink a large crop below its source size.
    assert zoomed_size((400, 100), ViewConfig(zoom=2.0, max_pixels=10_000)) == (200, 50)
    w, h = zoomed_size((640, 480), ViewConfig())
    assert w * h <= 1_003_520 and w * h > 0.99 * 1_003_520
    assert abs(w / h - 640 / 480) < 0.01
    image, _ = _noise(400, 300)
    crop = teacher_view(image, [Box(0, 0, 400, 300)], ViewConfig(zoom=3.0, max_pixels=30_000))
    assert crop.width * crop.height <= 30_000 and crop.size == (200, 150)


# ---------------------------------------------------------------------- student view --


def test_student_box_is_drawn_outside_the_evidence():
    image, arr = _noise(red=False)
    box = Box(50, 50, 80, 70)
    out = np.asarray(student_view(image, [box], _cfg(draw_box=True, box_width=3)))
    np.testing.assert_array_equal(out[50:70, 50:80], arr[50:70, 50:80])  # evidence untouched
    assert out[60, 47:50].tolist() == [[255, 0, 0]] * 3  # 3 px line just left of the box
    assert out[60, 80:83].tolist() == [[255, 0, 0]] * 3  # and just right of it
    assert out[60, 46].tolist() == arr[60, 46].tolist()
    # With a margin the line moves out by that many pixels.
    out = np.asarray(student_view(image, [box], _cfg(draw_box=True, box_width=2, box_margin=2)))
    assert out[60, 48:50].tolist() == arr[60, 48:50].tolist()
    assert out[60, 46:48].tolist() == [[255, 0, 0]] * 2
    np.testing.assert_array_equal(np.asarray(image), arr)  # input never modified


def test_student_without_box_is_an_unmodified_copy():
    image, arr = _noise()
    out = student_view(image, [Box(1, 1, 5, 5)], _cfg(draw_box=False))
    assert out is not image
    np.testing.assert_array_equal(np.asarray(out), arr)


def test_auto_line_width_scales_with_image():
    image, _ = _noise(1000, 1000, red=False)
    out = np.asarray(student_view(image, [Box(400, 400, 500, 500)], _cfg(draw_box=True, box_width=0)))
    red = np.all(out[450, 380:400] == (255, 0, 0), axis=-1)
    assert red.sum() == 4  # max(2, round(1000 / 250))


def test_make_views_teacher_has_no_red_even_when_student_has_box():
    image, arr = _noise(red=False)
    sample = Sample(id="s", image=image, question="Q?", boxes=[Box(60, 30, 90, 50)])
    student, teacher, text = make_views(sample, ViewConfig(draw_box=True, hint=True))
    s = np.asarray(student)
    assert np.all(s == (255, 0, 0), axis=-1).sum() > 0
    region = evidence_region(sample.boxes, image.size, ViewConfig())
    # 30x20 box + 0.5 context -> 60x40, height grown to min_side 56, then zoom 2.
    assert region == Box(45, 12, 105, 68)
    assert teacher.size == (120, 112)
    assert int(np.asarray(teacher)[..., 0].max()) == 0  # cut from the clean image
    assert text == f"Q?\n\n{HINT}"


def test_make_views_provided_crop_and_errors():
    image, _ = _noise()
    crop = Image.new("RGB", (30, 20), (7, 8, 9))
    sample = Sample(id="s", image=image, question="Q?", boxes=[Box(0, 0, 10, 10)], teacher_image=crop)
    _, teacher, _ = make_views(sample, ViewConfig())
    assert teacher.size == (30, 20) and teacher.getpixel((0, 0)) == (7, 8, 9)
    _, teacher, _ = make_views(sample, ViewConfig(use_provided_crop=False, min_side=1, context=0))
    assert teacher.size == (20, 20)
    # A provided crop above the pixel budget is downscaled to fit.
    _, teacher, _ = make_views(sample, ViewConfig(max_pixels=150))
    assert teacher.size == (15, 10)
    with pytest.raises(RecordError, match="field 'boxes'.*no evidence boxes"):
        make_views(Sample(id="n", image=image, question="Q?"), ViewConfig())
    with pytest.raises(RecordError, match="field 'boxes'.*outside"):
        make_views(Sample(id="o", image=image, question="Q?", boxes=[Box(500, 5, 510, 9)]), ViewConfig())


# ------------------------------------------------------------------------- prompt text --


def test_prompt_text_layout():
    mc = Sample(id="s", image="", question="What colour is the car? ", options=["red", "blue"])
    assert prompt_text(mc, hint=True) == (f"What colour is the car?\n\n{HINT}\n\nA. red\nB. blue\n\n{INSTRUCTION}")
    assert prompt_text(mc, hint=False) == (f"What colour is the car?\n\nA. red\nB. blue\n\n{INSTRUCTION}")
    open_q = Sample(id="t", image="", question="Read the sign.")
    assert prompt_text(open_q, hint=False) == "Read the sign."
    assert prompt_text(open_q, hint=True) == f"Read the sign.\n\n{HINT}"
    assert math.isclose(len(HINT), 91)
