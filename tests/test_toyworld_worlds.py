"""Named toy worlds: the shipped world M is unchanged, the resolution-gap world R and its data spec."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest

import vopd.toyworld  # noqa: F401  registers the toyworld:N[:SEED[:WORLD]] data spec
from vopd.data import load_train_samples
from vopd.toyworld.demo import DemoConfig
from vopd.toyworld.scenes import COLOURS, NEUTRAL_FILL, OUTLINE_COLOUR, WORLDS, SceneConfig, make_dataset, world_config


def _digest(samples) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(s.image.tobytes())
        h.update(repr(s.boxes).encode())
        h.update((s.question + s.answer).encode())
    return h.hexdigest()


def test_world_m_is_bit_identical_to_the_shipped_scenes() -> None:
    # Digest of make_dataset(5, 1) computed with the code before named worlds existed: the
    # default world (and so the shipped base's numbers) must not move.
    expected = "2d369b8ce0616296e248e69ccde9de9093515f8ce7e4e186cb588c53b6706d61"
    assert _digest(make_dataset(5, 1)) == expected
    assert _digest(make_dataset(5, 1, world_config("M"))) == expected
    assert WORLDS["M"] == SceneConfig()


def test_world_r_keeps_the_layout_and_puts_the_colour_in_a_small_mark() -> None:
    m, r = make_dataset(6, 3), make_dataset(6, 3, world_config("R"))
    size = world_config("R").mark_size
    assert size == 4
    for sm, sr in zip(m, r):
        # Same layout, question, answer and gold box: only the drawing of the colour changes.
        assert (sm.question, sm.answer, sm.boxes, sm.meta) == (sr.question, sr.answer, sr.boxes, sr.meta)
        pixels = np.asarray(sr.image)
        for obj in sr.meta["objects"]:
            x0, y0, x1, y1 = obj["box"]
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            colour = COLOURS[obj["colour"]]
            # The mark: size x size pixels of the object's colour at its centre, grey around it.
            mark = pixels[cy - size // 2 : cy - size // 2 + size, cx - size // 2 : cx - size // 2 + size]
            assert (mark == colour).all()
            # Just right of the mark: the grey fill (or the target's outline, in a narrow triangle).
            assert tuple(pixels[cy, cx + size]) in (NEUTRAL_FILL, OUTLINE_COLOUR)
            inside = pixels[y0:y1, x0:x1].reshape(-1, 3)
            assert (inside == colour).all(axis=1).sum() == size * size


def test_mark_size_is_validated_and_worlds_are_named() -> None:
    with pytest.raises(ValueError, match="mark_size"):
        SceneConfig(mark_size=10)
    with pytest.raises(ValueError, match="unknown toy world 'Q'"):
        world_config("Q")


def test_data_spec_names_the_world() -> None:
    assert _digest(load_train_samples("toyworld:3:5")) == _digest(make_dataset(3, 5))
    assert _digest(load_train_samples("toyworld:3:5:R")) == _digest(make_dataset(3, 5, world_config("R")))
    with pytest.raises(ValueError, match="unknown toy world 'Q'"):
        load_train_samples("toyworld:3:5:Q")
    with pytest.raises(ValueError, match="toyworld:N:SEED:WORLD"):
        load_train_samples("toyworld:3:5:R:1")


def test_demo_world_reaches_training_and_probe_scenes() -> None:
    shipped = DemoConfig(steps=2).train_overrides()
    assert "data.train=toyworld:32:1" in shipped and "health.probe_data=toyworld:64:124" in shipped
    world_r = DemoConfig(steps=2, world="R").train_overrides()
    assert "data.train=toyworld:32:1:R" in world_r and "health.probe_data=toyworld:64:124:R" in world_r


def test_pretraining_full_scene_draws_full_rows_from_another_world() -> None:
    from vopd.toyworld import pretrain

    r, m = world_config("R"), world_config("M")
    mixed = pretrain.PretrainConfig(crops=2, full=1, boxed_full=1, scene=r, full_scene=m)
    views = pretrain._step_views(mixed)
    scenes = pretrain._train_scenes(mixed, 0, len(views))
    only_r = pretrain._train_scenes(dataclasses.replace(mixed, full_scene=None), 0, len(views))
    only_m = pretrain._train_scenes(dataclasses.replace(mixed, scene=m, full_scene=None), 0, len(views))
    for view, s, sr, sm in zip(views, scenes, only_r, only_m):
        expected = sm if view in ("full", "boxed_full") else sr
        assert s.image.tobytes() == expected.image.tobytes() and s.answer == expected.answer
    assert only_r[0].image.tobytes() != only_m[0].image.tobytes()


@pytest.mark.slow
def test_demo_on_world_r_trains_and_evaluates_world_r_scenes(tmp_path, monkeypatch, capsys) -> None:
    """`vopd demo --world R`, reduced: training and held-out scenes are world R's; results.json
    names the world; with the shipped (world-M) base it warns."""
    import vopd.train_setup as train_setup
    from vopd.toyworld import demo as demo_mod
    from vopd.toyworld.evaluate import HeldOutEvaluator

    trained_on, held_out = [], []

    class SpyDataset(train_setup.ViewDataset):
        def __init__(self, samples, *a, **k):
            trained_on.extend(samples)
            super().__init__(samples, *a, **k)

    class SpyEvaluator(HeldOutEvaluator):
        def __init__(self, samples, *a, **k):
            held_out.extend(samples)
            super().__init__(samples, *a, **k)

    monkeypatch.setattr(train_setup, "ViewDataset", SpyDataset)
    monkeypatch.setattr("vopd.toyworld.evaluate.HeldOutEvaluator", SpyEvaluator)
    cfg = DemoConfig(
        out=str(tmp_path),
        steps=1,
        eval_every=1,
        n_eval=6,
        threads=1,
        world="R",
        overrides=("prompts_per_step=4", "micro_batch_prompts=4"),
    )
    results = demo_mod.run_demo(cfg)
    assert results["world"] == "R"
    assert "trained on world M, not R" in capsys.readouterr().out
    r = world_config("R")
    assert [s.image.tobytes() for s in held_out] == [s.image.tobytes() for s in make_dataset(6, 123, r)]
    assert len(trained_on) == 16
    assert [s.image.tobytes() for s in trained_on] == [s.image.tobytes() for s in make_dataset(16, 1, r)]
