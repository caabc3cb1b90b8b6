from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from weakcell.cli import main, split_args, stage_main
from weakcell.config import (
    OUTPUT_INPUTS,
    Config,
    ConfigError,
    Inputs,
    all_keys,
    changed_settings,
    load_config,
    parse_overrides,
    save_config,
)
from weakcell.errors import StageError, UnknownName

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_validate(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.name


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        REPO / "configs/demo.yaml", ["synthetic.n_train=7", "cache.splits=[train]", "data.dir=null"]
    )
    assert cfg.synthetic.n_train == 7
    assert cfg.cache.splits == ["train"]
    assert cfg.data.dir is None


def test_override_values_are_never_evaluated():
    nested = parse_overrides(["name=__import__('os').system('false')"])
    assert nested["name"] == "__import__('os').system('false')"


@pytest.mark.parametrize(
    ("override", "unknown", "suggestion"),
    [
        ("synthetic.n_trian=3", "'synthetic.n_trian'", "'synthetic.n_train'"),
        ("sythetic.n_train=3", "'sythetic'", "'synthetic'"),
        ("cache.crop=32", "'cache.crop'", "'cache.crop_size'"),
    ],
)
def test_unknown_key_names_itself_and_closest(override, unknown, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/demo.yaml", [override])
    message = str(err.value)
    assert f"unknown config key {unknown}" in message
    assert f"did you mean {suggestion}" in message


def test_unknown_key_in_yaml_fails(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("folds:\n  n_split: 3\n")
    with pytest.raises(ConfigError, match=r"folds\.n_split.*folds\.n_splits"):
        load_config(path)


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"cache\.crop_size"):
        load_config(None, ["cache.crop_size=big"])


def test_base_chain_and_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("name: a\nfolds:\n  n_splits: 3\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nname: b\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert (cfg.name, cfg.folds.n_splits) == ("b", 3)
    (tmp_path / "c.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="names itself"):
        load_config(tmp_path / "c.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs/competition.yaml", ["seed=7"])
    written = save_config(cfg, tmp_path / "run")
    again = load_config(written)
    assert again == cfg
    assert yaml.safe_load(written.read_text())["seed"] == 7


def test_paths_resolve_against_root(tmp_path):
    cfg = load_config(None, [f"paths.root={tmp_path}", "data.dataset=hpa2018"])
    assert cfg.data_dir == tmp_path / "data" / "hpa2018"
    assert cfg.folds_file == tmp_path / "folds" / "hpa2018.csv"
    assert cfg.cache_dir == tmp_path / "cache" / "hpa2018" / "classical"


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ([], "hpa2018.csv"),
        (["folds.n_splits=4", "folds.seed=7"], "hpa2018-4x7.csv"),
        (["folds.group_column=plate"], "hpa2018-5x42-by-plate.csv"),
        (["folds.duplicates=reports/duplicates.json"], "hpa2018-5x42-dups.csv"),
        (["folds.external=[data/x]"], "hpa2018-5x42-ext.csv"),
        (
            ["folds.duplicates=d.json", "folds.external=[x]", "folds.external_mode=folded"],
            "hpa2018-5x42-dups-ext-folded.csv",
        ),
        (["folds.report=r.md", "folds.external_mode=folded"], "hpa2018.csv"),  # no external set to fold
    ],
)
def test_each_fold_setting_has_its_own_file(overrides, name):
    assert load_config(None, ["data.dataset=hpa2018", *overrides]).folds_file.name == name


def test_shard_flags_become_keys():
    path, overrides = split_args(["configs/demo.yaml", "--shard-index", "2", "--num-shards=4", "seed=1"])
    assert path == "configs/demo.yaml"
    cfg = load_config(REPO / path, overrides)
    assert (cfg.cache.shard_index, cfg.cache.num_shards, cfg.seed) == (2, 4, 1)


def test_cli_lists_keys_and_rejects_unknown_stage(capsys):
    assert main(["keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert {line.split()[0] for line in lines if line.startswith("  ") and line[2] != " "} == set(all_keys())
    assert main(["fodls"]) == 2
    assert "did you mean 'folds'" in capsys.readouterr().err


def test_cli_reports_config_errors_as_one_line(capsys):
    assert main(["folds", str(REPO / "configs/demo.yaml"), "folds.n_splits=one"]) == 2
    assert "folds.n_splits" in capsys.readouterr().err


def _raising(error: BaseException):
    def run(cfg: Config) -> None:
        raise error

    return run


@pytest.mark.parametrize(
    "error",
    [
        StageError("run runs/x was trained with other settings; retrain it with FORCE=1"),
        FileNotFoundError("no folds file folds/x.csv; run `make folds` first"),
        UnknownName("unknown dataset 'hpa2019'; known: hpa2018, hpa2021"),
    ],
)
def test_cli_reports_expected_errors_as_one_line(error, capsys):
    assert stage_main(_raising(error), []) == 2
    err = capsys.readouterr().err
    assert err == f"error: {error.args[0]}\n"  # the message alone: no traceback, no KeyError quotes


def test_cli_keeps_the_traceback_of_unexpected_errors(capsys):
    """A ValueError or KeyError that is not the kit's own is a bug (here a library's): it propagates, so
    Python prints where it came from, instead of one line that hides it."""
    with pytest.raises(ValueError, match="reshape"):
        stage_main(lambda cfg: np.zeros(2).reshape(3), [])
    with pytest.raises(KeyError, match="p_19"):
        stage_main(lambda cfg: {"p_0": 0.5}["p_19"], [])
    assert capsys.readouterr().err == ""


def test_cli_validate_takes_a_file(tmp_path, capsys):
    bad = tmp_path / "submission.csv"
    bad.write_text("ID,ImageWidth,ImageHeight,PredictionString\na,2048,2048,19 0.5 eNoLCAgIMAEABJkBdQ==\n")
    assert main(["validate", str(bad)]) == 2
    captured = capsys.readouterr()
    assert "row 0" in captured.err + captured.out


def test_a_setting_added_later_counts_as_its_first_default_in_saved_runs(tmp_path: Path) -> None:
    """A run saved before ``refine.uncertain`` existed trained a missed image label as 0: the setting's
    first default, "negative". Today's default is "ignore", so that run differs from a default config and
    matches one that asks for "negative"."""
    cfg = Config()
    save_config(cfg, tmp_path)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del saved["refine"]["uncertain"]  # a run saved before the setting existed
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert changed_settings(tmp_path, cfg, Inputs(("refine.",))) == [
        "refine.uncertain: 'negative' -> 'ignore'"
    ]
    as_then = cfg.model_copy(update={"refine": cfg.refine.model_copy(update={"uncertain": "negative"})})
    assert changed_settings(tmp_path, as_then, Inputs(("refine.",))) == []
    del saved["refine"]["epochs"]  # a setting whose default never changed reads as today's
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert changed_settings(tmp_path, as_then, Inputs(("refine.",))) == []


@pytest.mark.parametrize(("override", "got"), [("infer.tta=[0,8]", "8"), ("infer.tta=[-1]", "-1")])
def test_tta_codes_outside_the_eight_symmetries_are_one_line_config_errors(override, got):
    """A code the symmetries of the square do not have (0..7) would predict from uninitialised memory."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert "\n" not in message and "infer.tta" in message and f"(got {got})" in message


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.device=mps", "train.device"),
        ("refine.score=stage2", "refine.score"),
        ("infer.tta=[]", "infer.tta"),
    ],
)
def test_closed_choices_are_checked_at_load(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_each_output_is_invalidated_by_its_inputs_only(tmp_path: Path) -> None:
    """One finished output of each kind, saved with the defaults (or ``base``); which changed setting makes
    it stale. What an output is made from besides settings (the data, the cache, the folds file) is its
    upstream (weakcell.lineage), so their settings do not reach the outputs made from them."""

    def stale(output: str, override: str, *base: str) -> bool:
        folder = tmp_path / "-".join(base or ("defaults",))
        save_config(load_config(None, list(base)), folder)
        changed = load_config(None, [*base, override])
        return bool(changed_settings(folder, changed, OUTPUT_INPUTS[output]))

    # round 0: what the folds compute from, not where they run nor the later stages' settings
    assert stale("run", "train.lr=0.01") and stale("run", "mil.gated=false") and stale("run", "seed=1")
    assert not stale("run", "train.workers=4") and not stale("run", "train.folds=[0]")
    assert not stale("run", "thresholds.shrinkage=5") and not stale("run", "refine.relative=0.5")
    assert not stale("run", "synthetic.workers=2") and not stale("run", "segment.cellpose.batch_size=2")
    # the data, the segmentation and the folds reach a run as the content they made (its upstream)
    assert not stale("run", "synthetic.noise=0.5") and not stale("run", "segment.backend=cellpose")
    assert not stale("run", "folds.seed=7") and not stale("run", "data.dir=elsewhere")
    # a refinement round: round 0's inputs and the rule, not how many rounds there are
    assert stale("refine", "refine.relative=0.5") and stale("refine", "train.lr=0.01")
    assert not stale("refine", "refine.rounds=3") and not stale("refine", "train.device=cpu")
    # ... and what the rule reads under its settings: the submitted confidence's formula when it scores
    # cells by it, the tuned thresholds when it draws a floor from them
    assert not stale("refine", "infer.image_power=3") and not stale("refine", "infer.image_best_cell=0.5")
    assert stale("refine", "infer.image_power=3", "refine.score=confidence")
    assert stale("refine", "infer.image_best_cell=0.5", "refine.score=confidence")
    assert not stale("refine", "infer.tta=[0]", "refine.score=confidence")
    assert not stale("refine", "thresholds.shrinkage=5")
    assert stale("refine", "thresholds.shrinkage=5", "refine.threshold_scale=0.5")
    # the cache: the images' layout, its backend's settings and the crop size
    assert stale("cache", "segment.backend=cellpose") and stale("cache", "cache.crop_size=32")
    assert not stale("cache", "cache.workers=2") and not stale("cache", "model.backbone=resnet34")
    assert not stale("cache", "segment.sam.device=cpu") and not stale("cache", "synthetic.workers=2")
    assert stale("cache", "segment.classical.nucleus_diameter=90")
    assert not stale("cache", "segment.cellpose.diameter=30") and not stale("cache", "data.dir=elsewhere")
    assert stale("cache", "segment.cellpose.diameter=30", "segment.backend=cellpose")
    # ... the side its sizes hold at, and of a learned backend what it computes, not how it batches
    assert stale("cache", "segment.reference_size=2048")
    assert stale("cache", "segment.hpacellseg.network_scale=0.5", "segment.backend=hpacellseg")
    assert not stale("cache", "segment.hpacellseg.batch_size=2", "segment.backend=hpacellseg")
    assert not stale("cache", "segment.hpacellseg.device=cpu", "segment.backend=hpacellseg")
    assert not stale("cache", "cache.batched=always") and not stale("cache", "cache.queue_images=4")
    # the networks inference builds: architecture only
    assert stale("model", "model.backbone=resnet34") and stale("model", "mil.hidden=64")
    assert not stale("model", "mil.lr=0.1") and not stale("model", "train.epochs=9")
    # a data set, a folds file and a checkpoint: the workers that make them change nothing they hold, and a
    # checkpoint resumes whichever folds the call that continues it trains
    assert stale("synthetic", "synthetic.n_train=10") and not stale("synthetic", "synthetic.workers=3")
    assert stale("folds", "folds.seed=7") and not stale("folds", "folds.file=folds/mine.csv")
    # ... and its groups (external's keys), not where its report goes
    assert stale("folds", "folds.duplicates=reports/duplicates.json") and stale("folds", "folds.external=[x]")
    assert stale("folds", "folds.external_mode=folded") and not stale("folds", "folds.report=r.md")
    assert stale("checkpoint", "train.lr=0.01") and not stale("checkpoint", "train.compile=true")
    assert not stale("checkpoint", "train.folds=[0]")


# -- issue 26: one config per project, help that answers, errors blamed where they were made ---------------


def test_a_project_config_elsewhere_finds_its_base_among_the_kit_configs(tmp_path):
    """`base: hpa2021.yaml` in a config outside configs/ was looked up beside the file only."""
    project = tmp_path / "elsewhere" / "weakcell.yaml"
    project.parent.mkdir()
    project.write_text("base: hpa2021.yaml\nname: mine\nrefine:\n  rounds: 0\n")
    cfg = load_config(project)
    assert (cfg.name, cfg.data.dataset, cfg.refine.rounds, cfg.folds.n_splits) == ("mine", "hpa2021", 0, 5)
    (project.parent / "hpa2021.yaml").write_text("base: demo.yaml\nname: local\nfolds:\n  n_splits: 4\n")
    assert load_config(project).folds.n_splits == 4  # one beside the file wins
    project.write_text("base: hpa2022.yaml\n")
    with pytest.raises(
        ConfigError, match=r"base 'hpa2022\.yaml' not found beside it nor in the kit's configs"
    ):
        load_config(project)


def test_a_bad_value_is_blamed_where_it_was_set(tmp_path):
    """A bad value given on the command line was blamed on the YAML file."""
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  epochs: many\n")
    project = tmp_path / "project.yaml"
    project.write_text("base: base.yaml\ncache:\n  crop_size: 64\n")
    with pytest.raises(ConfigError) as err:
        load_config(project, ["cache.crop_size=big", "train.epochs=3"])
    assert "cache.crop_size on the command line: " in str(err.value)
    assert str(project) not in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(project)
    assert f"train.epochs in {base}: " in str(err.value)
    project.write_text("base: base.yaml\ntrain:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=rf"unknown config key 'train\.epoch' in {re.escape(str(project))}"):
        load_config(project, ["train.epochs=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.epoch' on the command line"):
        load_config(None, ["train.epoch=3"])


def test_every_key_has_a_description():
    from weakcell.config import describe_keys

    assert [key for key, _, description in describe_keys() if not description] == []


def test_stage_help_lists_the_keys_it_reads_with_defaults(capsys, tmp_path):
    """`weakcell train --help` failed with 'config file not found: --help'."""
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: weakcell train" in out
    epochs = next(line for line in out.splitlines() if line.split()[:1] == ["train.epochs"])
    assert epochs.split()[1] == "4" and "stage-1 (cell model) epochs per fold" in epochs
    assert "synthetic.n_train" not in out and "kaggle.owner" not in out  # keys train does not read
    assert main(["thresholds", str(REPO / "configs/demo.yaml"), "--help"]) == 0
    out = capsys.readouterr().out
    assert "in " + str(REPO / "configs/demo.yaml") in out
    assert next(line for line in out.splitlines() if "refine.rounds" in line).split()[1] == "1"


def test_keys_prints_defaults_and_descriptions_of_a_prefix(capsys):
    assert main(["keys", "refine.rounds", "checks."]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (
        lines[0].split()[:2] == ["refine.rounds", "1"] and "0 = the inheritance + MIL run alone" in lines[0]
    )
    assert {line.split()[0] for line in lines} == {
        "refine.rounds",
        "checks.max_missing_share",
        "checks.lock_wait_s",
        "checks.allow_empty_rows",
    }
    assert main(["keys", "nosuch."]) == 2


def test_an_unknown_backbone_is_a_config_error_before_any_folder(tmp_path, capsys):
    """A mistyped backbone gave a raw `RuntimeError: Unknown model` traceback after creating runs/<name>/."""
    assert main(["train", f"paths.root={tmp_path}", "model.backbone=mobilnetv3_small_100"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'mobilenetv3_small_100'" in err
    assert list(tmp_path.iterdir()) == []


def test_make_demo_runs_its_stages_in_one_process_on_one_config(monkeypatch, capsys):
    """Issue 26: every stage of `make demo` started an interpreter and imported torch again; the chain
    runs them in order in one process, each on the same resolved config."""
    import weakcell.cli as cli

    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(cli, "_resolve", lambda target: lambda cfg: seen.append((target, cfg.name)))
    assert main(["demo", "name=chained", "refine.rounds=0"]) == 0
    assert [target for target, _ in seen] == [cli.STAGES[name].target for name in cli.CHAINS["demo"]]
    assert {name for _, name in seen} == {"chained"}
    assert "== weakcell refine" in capsys.readouterr().out


def test_a_mapping_setting_is_replaced_whole_while_sections_merge(tmp_path: Path) -> None:
    """``ablate.variants={}`` on the command line means no variants (it used to merge into the base's four
    and keep them all); a child file's ``variants`` replaces its base's too, and sections still merge."""
    base = tmp_path / "base.yaml"
    base.write_text(
        "train: {epochs: 12, validate_every: 4}\n"
        "ablate: {variants: {soft: {targets: soft}, ignore: {uncertain: ignore}}}\n"
    )
    assert set(load_config(base).ablate.variants) == {"soft", "ignore"}
    assert load_config(base, ["ablate.variants={}"]).ablate.variants == {}
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\ntrain: {epochs: 3}\nablate: {variants: {drop: {unlabelled: drop}}}\n")
    cfg = load_config(child)
    assert cfg.ablate.variants == {"drop": {"unlabelled": "drop"}}
    assert (cfg.train.epochs, cfg.train.validate_every) == (3, 4)  # the section merged
