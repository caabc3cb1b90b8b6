"""``weakcell init``: one config per project, holding the choices once (issue 26)."""

from __future__ import annotations

import pytest
import yaml

from weakcell.cli import main
from weakcell.config import load_config


@pytest.mark.parametrize(
    ("template", "dataset"), [("hpa2021", "hpa2021"), ("hpa2018", "hpa2018"), ("competition", "hpa2021")]
)
def test_init_writes_a_project_config_every_stage_reads(tmp_path, monkeypatch, capsys, template, dataset):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kaggle-files").mkdir()
    code = main(["init", template, "proj", "data.dir=kaggle-files", "refine.rounds=0", "train.epochs=3"])
    assert code == 0, capsys.readouterr().err
    path = tmp_path / "proj" / "weakcell.yaml"
    text = path.read_text()
    assert text.splitlines()[3].startswith(f"base: {template}.yaml")
    raw = yaml.safe_load(text)
    # the choices, once, absolute where they are paths; what was given beside them kept
    assert raw["paths"]["root"] == str(tmp_path / "proj") and raw["data"]["dir"] == str(
        tmp_path / "kaggle-files"
    )
    assert raw["refine"] == {"rounds": 0} and raw["train"] == {"epochs": 3}
    assert {"segment", "model"} <= set(raw) and "pretrained_file" in raw["model"]
    cfg = load_config(path)
    assert (cfg.data.dataset, cfg.refine.rounds, cfg.train.epochs) == (dataset, 0, 3)
    assert cfg.run_dir == tmp_path / "proj" / "runs" / cfg.name and cfg.model_dir == cfg.run_dir
    assert f"next: make check CONFIG={tmp_path / 'proj' / 'weakcell.yaml'}" in capsys.readouterr().out
    # written once: a second init refuses unless --force
    assert main(["init", template, "proj"]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["init", template, "proj", "--force"]) == 0


def test_init_refuses_what_would_not_load_and_writes_nothing(tmp_path, capsys):
    assert main(["init", "hpa2021", str(tmp_path / "a"), "model.backbone=resnet5O"]) == 2
    assert "did you mean 'resnet50'" in capsys.readouterr().err
    assert (
        not (tmp_path / "a" / "weakcell.yaml").exists()
        and not (tmp_path / "a" / "weakcell.yaml.tmp").exists()
    )
    assert main(["init", "hpa2019", str(tmp_path / "b")]) == 2
    assert "known: hpa2021, hpa2018" in capsys.readouterr().err
    assert main(["init", "hpa2021"]) == 2
    assert "usage: weakcell init" in capsys.readouterr().err
