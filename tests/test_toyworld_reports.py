"""Toy-world reports name the configuration that actually ran and every path they
print resolves from where they are written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vopd.toyworld.ablations import OPD_VARIANTS, ablation_table
from vopd.toyworld.demo import DemoConfig, demo_train_config
from vopd.toyworld.run_info import describe_configuration, run_configuration


def _conf(*overrides: str) -> dict:
    return run_configuration(demo_train_config(DemoConfig(overrides=overrides)))


def test_configuration_follows_overrides_not_demo_defaults():
    # The demo's own default is a frozen teacher; an ablation's override must win in the label.
    assert DemoConfig().teacher == "frozen"
    live = _conf(*OPD_VARIANTS["live teacher"])
    assert live["teacher"] == "live" and live["teacher_rate"] is None
    ema = _conf(*OPD_VARIANTS["EMA 0.01 teacher"])
    assert ema["teacher"] == "ema" and ema["teacher_rate"] == pytest.approx(0.01)
    control = _conf(*OPD_VARIANTS["control: teacher sees the full image"])
    assert control["teacher_view"] == "full" and control["teacher"] == "frozen"
    sampled = _conf(*OPD_VARIANTS["sampled-token estimator"])
    assert (sampled["estimator"], sampled["beta"], sampled["support"]) == ("sampled", 1.0, "sampled token")
    boxed = _conf(*OPD_VARIANTS["red box + hint student"])
    assert boxed["student_view"] == "full + red box + hint, crop replay 5%"  # the recipe's replay share
    assert _conf("views.student_crop_share=0")["student_view"] == "full"
    default = _conf()
    assert default == {
        "objective": "opd",
        "teacher": "frozen",
        "teacher_rate": None,
        "teacher_view": "crop",
        "estimator": "topk",
        "beta": 0.5,
        "support": "student top-100 + tail",
        "student_view": "full, crop replay 5%",
        "crop_source": "box",
    }
    search = _conf("views.crop_source=search")
    assert search["crop_source"] == "search" and "no gold box read in training" in describe_configuration(search)


def test_every_variant_gets_a_distinct_description():
    texts = {name: describe_configuration(_conf(*ov)) for name, ov in OPD_VARIANTS.items()}
    assert len(set(texts.values())) == len(texts), texts
    assert "teacher live on the crop" in texts["live teacher"]
    assert "teacher ema 0.05 on the crop" in texts["EMA 0.05 teacher (paper default)"]
    assert "teacher frozen on the full" in texts["control: teacher sees the full image"]
    assert "beta 0," in texts["forward KL (beta 0)"]
    assert describe_configuration(None) == "(configuration not recorded)"


def test_ablation_table_prints_the_recorded_configuration():
    curve = [
        {"step": 0, "full": 0.5, "crop": 0.99, "boxed_full": 0.6},
        {"step": 2, "full": 0.6, "crop": 0.98, "boxed_full": 0.7},
    ]
    table = ablation_table(
        {
            "live teacher": {"config": _conf("teacher.kind=live"), "curve": curve, "health": []},
            "old row": {"curve": curve},  # recorded before configurations were saved
        }
    )
    rows = table.splitlines()
    assert "configuration that ran" in rows[0]
    assert "teacher live on the crop" in rows[2] and "(configuration not recorded)" in rows[3]


def _check_paths(folder: Path) -> None:
    """Every file a report links and every path results.json records exists."""
    results = json.loads((folder / "results.json").read_text())
    assert (folder / results["checkpoint"] / "model.safetensors").is_file(), results["checkpoint"]
    assert not Path(results["checkpoint"]).is_absolute()
    assert (folder / results["report"]).is_file()
    links = re.findall(r"\]\(([^)]+)\)", (folder / "report.md").read_text())
    assert links
    for link in links:
        assert (folder / link).is_file(), link


@pytest.mark.slow
def test_tiny_live_ablation_reports_live_everywhere(tmp_path, capsys, monkeypatch):
    """A reduced `vopd demo --ablations live` (2 steps, 20 held-out scenes), run from another
    working directory: header, table, JSON and console line say teacher live, paths resolve."""
    from vopd.cli import main

    out = tmp_path / "D"
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rc = main(
        [
            "demo",
            "--out",
            "../D",
            "--ablations",
            "live",
            "--steps",
            "2",
            "--eval-every",
            "2",
            "--n-eval",
            "20",
            "--threads",
            "1",
            "prompts_per_step=4",
            "micro_batch_prompts=4",
            "health.probe_data=toyworld:8:124",
        ]
    )
    assert rc == 0
    console = capsys.readouterr().out
    sub = out / "live_teacher"
    saved = json.loads((sub / "results.json").read_text())
    assert saved["teacher"] == "live" and saved["config"]["teacher"] == "live"
    assert saved["config"]["teacher_view"] == "crop" and saved["steps"] == 2
    report = (sub / "report.md").read_text()
    assert "teacher live on the crop" in report and "| teacher | live |" in report
    assert "frozen" not in report
    assert "configuration: opd, teacher live on the crop" in console
    assert "teacher=frozen" not in console and "teacher frozen" not in console
    ablations = json.loads((out / "ablations.json").read_text())
    assert list(ablations) == ["live teacher"]
    assert ablations["live teacher"]["config"]["teacher"] == "live"
    assert (out / ablations["live teacher"]["results"]).is_file()
    assert "teacher live on the crop" in (out / "ablations.md").read_text()
    _check_paths(sub)
    printed = re.search(r"report: (\S+)", console).group(1)
    assert Path(printed).is_file(), printed
