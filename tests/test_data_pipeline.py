"""Step sampler (exact data position on resume, sharding) and checkpoint RNG round trip."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import vopd.toyworld  # noqa: F401  registers the toyworld:N data spec used below
from vopd.checkpoint import _to_plain, restore_rng, rng_state
from vopd.data import StepSampler


def _sampler(**kw):
    base = dict(prompts_per_step=4, micro_batch_prompts=2, seed=3, num_steps=6)
    base.update(kw)
    return StepSampler(10, **base)


def test_every_prompt_once_per_epoch_then_reshuffled():
    s = _sampler()
    first_epoch = [i for step in range(2) for i in s.step_indices(step)] + s.step_indices(2)[:2]
    assert sorted(first_epoch) == list(range(10))
    second = s.step_indices(2)[2:] + s.step_indices(3) + s.step_indices(4)
    assert sorted(second) == list(range(10))
    assert first_epoch != second[:10]


def test_resume_start_step_continues_the_same_order():
    full = list(_sampler())
    resumed = list(_sampler(start_step=2))
    per_step = _sampler().micro_batches_per_step()
    assert per_step == 2
    assert resumed == full[2 * per_step :]
    assert len(_sampler(start_step=2)) == len(resumed)


def test_shards_cover_the_step_without_overlap():
    shards = [list(_sampler(rank=r, world_size=2)) for r in range(2)]
    for step in range(6):
        got = sorted(shards[0][step] + shards[1][step])  # one micro-batch of 2 per rank per step
        assert got == sorted(_sampler().step_indices(step))


def test_bad_sharding_and_empty_data_rejected():
    with pytest.raises(ValueError, match="divide"):
        StepSampler(10, prompts_per_step=3, micro_batch_prompts=1, seed=0, num_steps=1, world_size=2)
    with pytest.raises(ValueError, match="empty"):
        StepSampler(0, prompts_per_step=2, micro_batch_prompts=1, seed=0, num_steps=1)


def test_rng_state_round_trips_through_plain_types():
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    saved = _to_plain(rng_state())
    want = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    restore_rng(saved)
    got = (torch.rand(3), random.random(), np.random.rand())
    torch.testing.assert_close(got[0], want[0])
    assert got[1:] == want[1:]


def test_checkpoint_left_aside_by_a_crash_mid_resave_is_restored(tmp_path):
    """A crash between moving checkpoint-N aside and renaming its replacement in must not lose it."""
    from vopd.checkpoint import STATE_DIR, latest_checkpoint

    (tmp_path / "checkpoint-1" / STATE_DIR).mkdir(parents=True)
    (tmp_path / "checkpoint-1" / STATE_DIR / "state.json").write_text('{"step": 1}')
    aside = tmp_path / ".checkpoint-2.old-4242"
    (aside / STATE_DIR).mkdir(parents=True)
    (aside / STATE_DIR / "state.json").write_text('{"step": 2}')
    (tmp_path / ".checkpoint-2.tmp-4242").mkdir()  # the half-written replacement stays ignored
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert (tmp_path / "checkpoint-2" / STATE_DIR / "state.json").read_text() == '{"step": 2}'
    assert not aside.exists()


def test_aside_copy_is_dropped_when_its_replacement_landed(tmp_path):
    from vopd.checkpoint import STATE_DIR, latest_checkpoint

    for name, text in (("checkpoint-2", "new"), (".checkpoint-2.old-7", "old")):
        (tmp_path / name / STATE_DIR).mkdir(parents=True)
        (tmp_path / name / STATE_DIR / "state.json").write_text(text)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert (tmp_path / "checkpoint-2" / STATE_DIR / "state.json").read_text() == "new"
    assert not (tmp_path / ".checkpoint-2.old-7").exists()


def _write_rows(tmp_path, rows):
    import json

    from PIL import Image

    Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / "ok.png")
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_samples_missing_image_is_named_before_training(tmp_path):
    from vopd.data import load_train_samples
    from vopd.records import RecordError

    path = _write_rows(
        tmp_path,
        [
            {"id": "a", "image": "ok.png", "question": "q?", "boxes": [[1, 1, 10, 10]]},
            {"id": "b", "image": "missing.png", "question": "q?", "boxes": [[1, 1, 10, 10]]},
        ],
    )
    with pytest.raises(RecordError, match=r"train\.jsonl:2: field 'image'.*missing\.png"):
        load_train_samples(str(path))
    with pytest.warns(UserWarning, match=r"1 rows skipped[\s\S]*train\.jsonl:2"):
        samples = load_train_samples(str(path), on_error="skip")
    assert [s.id for s in samples] == ["a"]


def test_train_samples_out_of_bounds_box_is_clipped_and_counted_or_rejected(tmp_path):
    from vopd.data import load_train_samples
    from vopd.records import RecordError

    path = _write_rows(tmp_path, [{"id": "a", "image": "ok.png", "question": "q?", "boxes": [[20, 10, 60, 25]]}])
    with pytest.warns(UserWarning, match="1 boxes clipped"):
        (sample,) = load_train_samples(str(path))
    assert sample.boxes[0].as_list() == [20.0, 10.0, 40.0, 25.0]
    with pytest.raises(RecordError, match=r"train\.jsonl:1: field 'boxes\[0\]'.*outside"):
        load_train_samples(str(path), out_of_bounds="reject")


def test_malformed_toyworld_spec_is_a_clear_error():
    from vopd.data import load_train_samples

    with pytest.raises(ValueError, match="toyworld:N"):
        load_train_samples("toyworld:many")
    assert len(load_train_samples("toyworld:3:5")) == 3


def test_crop_replay_shows_the_student_the_teacher_crop_for_a_fixed_share():
    import dataclasses

    from vopd.data import ViewDataset
    from vopd.toyworld.scenes import TOY_VIEW, make_dataset
    from vopd.views import replay_draw

    samples = make_dataset(40, 5)
    plain = ViewDataset(samples, TOY_VIEW)
    replay = ViewDataset(samples, dataclasses.replace(TOY_VIEW, student_crop_share=0.5))
    chosen = [replay_draw(s.id) < 0.5 for s in samples]
    assert 5 < sum(chosen) < 35  # a share, not all or none
    for i, pick in enumerate(chosen):
        a, b = plain[i], replay[i]
        assert np.array_equal(np.asarray(a.teacher), np.asarray(b.teacher)) and a.text == b.text
        expected = a.teacher if pick else a.student  # replayed: the student reads the teacher's crop
        assert np.array_equal(np.asarray(b.student), np.asarray(expected))
        assert b.student.size == ((112, 112) if pick else (168, 168))
    # The draw depends on the id alone: the same samples in another order replay the same ids.
    reverse = ViewDataset(samples[::-1], dataclasses.replace(TOY_VIEW, student_crop_share=0.5))
    assert [reverse[i].student.size == (112, 112) for i in range(len(samples))] == chosen[::-1]
    with pytest.raises(Exception, match="student_crop_share"):
        dataclasses.replace(TOY_VIEW, student_crop_share=1.0)
