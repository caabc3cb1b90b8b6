"""Reliability: nothing is lost silently under concurrent runs, output faults, kills and bad files.

One test (or group) per reproduction of issue 17:
1. two runs on one output folder: the lock (real processes racing; many repetitions under ``-m slow``);
2. output faults (unwritable folders, a full disk) stop the stage instead of skipping images;
3. a kill during ``infer`` never leaves a mismatched pair, and its temporaries are cleaned;
4. labelled images the cache lacks are counted, recorded and refused above ``checks.max_missing_share``;
5. expected failures end in one line naming the file and the fix (no traceback, no weights_only=False);
6. ``weakcell validate`` says what it could not check without ``--sample``.

Real write faults need a user that file permissions stop: CI runs as root, so those tests run the stage in
a user namespace (``unshare -U``: root there has no power over the real root's files) and mount a tiny
tmpfs for the full disk (``unshare -rm``); they skip with the reason where namespaces are not allowed.
The in-process variants inject ``OSError`` at the rename that ends every atomic write.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import weakcell.cache.build as build
from tests.conftest import TEST, TINY, TRAIN
from weakcell.cache.store import CellCache
from weakcell.cli import main
from weakcell.config import load_config
from weakcell.outputs import LOCK_FILE, FolderInUse, OutputError, folder_lock

ALL_IMAGES = {**TRAIN, **TEST}


# -- helpers ------------------------------------------------------------------------------------------------


def cache_args(dataset: Path, cache_dir: Path, *more: str) -> list[str]:
    return [
        "data.dataset=hpa2021",
        f"data.dir={dataset}",
        f"cache.dir={cache_dir}",
        "cache.crop_size=16",
        "cache.workers=1",
        "cache.shard_mb=0.008",  # 8 crops per shard: several shards
        "segment.classical.nucleus_diameter=6",  # the real segmenter (subprocesses), at the blobs' scale
        "segment.classical.working_scale=1",
        *more,
    ]


def weakcell_command(stage: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "weakcell", stage, *args]


def run_stage(
    command: list[str], prefix: tuple[str, ...] = (), timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=timeout)


def cache_content(cache_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """What later stages read, without the shard layout."""
    cache = CellCache(cache_dir)
    return cache.cells.drop(columns=["shard", "row"]), cache.images, cache.crops(np.arange(len(cache)))


def assert_same_cache(left: Path, right: Path) -> None:
    a, b = cache_content(left), cache_content(right)
    pd.testing.assert_frame_equal(a[0], b[0])
    pd.testing.assert_frame_equal(a[1], b[1])
    np.testing.assert_array_equal(a[2], b[2])


@pytest.fixture
def reference_cache(dataset, tmp_path):
    """The cache of one undisturbed run, with the real segmenter (what a subprocess uses)."""
    cfg = load_config(None, cache_args(dataset, tmp_path / "reference"))
    build.run(cfg)
    cache = CellCache(cfg.cache_dir)
    assert len(cache.images) == len(ALL_IMAGES) and (cache.images["status"] == "ok").all()
    assert len(cache) > 20 and cache.cells["shard"].nunique() > 2
    return cfg.cache_dir


HOLDER = textwrap.dedent(
    """
    import os, sys
    from weakcell.outputs import folder_lock
    with folder_lock(sys.argv[1], "holder"):
        print("held", flush=True)
        if sys.argv[2] == "die":
            os.kill(os.getpid(), 9)
        sys.stdin.read()
    """
)


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s lock until its stdin closes."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), "hold"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def release(holder: subprocess.Popen) -> None:
    assert holder.stdin is not None
    holder.stdin.close()
    holder.wait(timeout=30)


# -- 1. one writer per output folder ----------------------------------------------------------------------


def test_a_second_cache_run_refuses_naming_the_holder(dataset, tmp_path, reference_cache):
    cache_dir = tmp_path / "cache"
    holder = hold_lock(cache_dir)
    try:
        refused = run_stage(weakcell_command("cache", *cache_args(dataset, cache_dir)))
    finally:
        release(holder)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in refused.stderr
    assert f"{cache_dir} is in use by `weakcell holder` (pid {holder.pid} on " in lines[0]
    assert "checks.lock_wait_s" in lines[0]
    assert not (cache_dir / "cells.parquet").exists()  # it wrote nothing
    # once the holder is gone, the same command builds the whole cache
    done = run_stage(weakcell_command("cache", *cache_args(dataset, cache_dir)))
    assert done.returncode == 0, done.stderr
    assert_same_cache(cache_dir, reference_cache)


def test_a_waiting_run_goes_on_when_the_holder_finishes(dataset, tmp_path, reference_cache):
    cache_dir = tmp_path / "cache"
    holder = hold_lock(cache_dir)
    waiting = subprocess.Popen(
        weakcell_command("cache", *cache_args(dataset, cache_dir, "checks.lock_wait_s=60")),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2)  # it has started and waits: the holder still holds the folder
    assert waiting.poll() is None and not (cache_dir / "cells.parquet").exists()
    release(holder)
    _, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    assert_same_cache(cache_dir, reference_cache)


def test_the_lock_of_a_killed_run_is_taken_over(dataset, tmp_path, reference_cache):
    cache_dir = tmp_path / "cache"
    killed = subprocess.run([sys.executable, "-c", HOLDER, str(cache_dir), "die"], capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert '"stage": "holder"' in (cache_dir / LOCK_FILE).read_text()  # its record stays behind
    done = run_stage(weakcell_command("cache", *cache_args(dataset, cache_dir)))
    assert done.returncode == 0, done.stderr
    assert "took over the lock" in done.stdout and "no longer running" in done.stdout
    assert_same_cache(cache_dir, reference_cache)
    assert (cache_dir / LOCK_FILE).read_text() == ""  # released in good order: an empty record


@pytest.mark.parametrize("stage", ["train", "refine", "thresholds", "infer"])
def test_every_writing_stage_takes_its_folder_lock(tmp_path, stage):
    cfg = load_config(None, [f"paths.root={tmp_path}", "refine.rounds=1"])
    folder = cfg.path(cfg.paths.submissions) / cfg.name if stage == "infer" else cfg.run_dir
    holder = hold_lock(folder)
    try:
        module = __import__(f"weakcell.{stage}", fromlist=["run"])
        with pytest.raises(FolderInUse, match=f"in use by `weakcell holder` \\(pid {holder.pid} "):
            module.run(cfg)
    finally:
        release(holder)


def test_split_cache_parts_share_the_folder_but_not_a_part(tmp_path):
    cache_dir = tmp_path / "cache"
    holder = hold_lock(cache_dir)  # an unsplit run (or a merge) holds the whole folder
    try:
        with (
            pytest.raises(FolderInUse, match="holder"),
            folder_lock(cache_dir, "cache", part="part000-of-002"),
        ):
            pass
    finally:
        release(holder)
    with folder_lock(cache_dir, "cache", part="part000-of-002"):  # two parts side by side
        other_part = (
            "from weakcell.outputs import folder_lock\nwith folder_lock('{}', 'cache', part='{}'): pass"
        )
        ok = subprocess.run([sys.executable, "-c", other_part.format(cache_dir, "part001-of-002")])
        same = subprocess.run(
            [sys.executable, "-c", other_part.format(cache_dir, "part000-of-002")],
            capture_output=True,
            text=True,
        )
        whole = subprocess.run(
            [
                sys.executable,
                "-c",
                f"from weakcell.outputs import folder_lock\nwith folder_lock('{cache_dir}', 'cache-merge'): pass",
            ],
            capture_output=True,
            text=True,
        )
    assert ok.returncode == 0
    assert same.returncode == 1 and f"pid {os.getpid()}" in same.stderr
    assert whole.returncode == 1 and f"in use by `weakcell cache` (pid {os.getpid()}" in whole.stderr


def race(dataset: Path, cache_dir: Path, *more: str) -> tuple[list[int], list[str]]:
    """Two `weakcell cache` processes started together on one folder; their exit codes and stderr."""
    command = weakcell_command("cache", *cache_args(dataset, cache_dir, *more))
    runs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [run.communicate(timeout=300) for run in runs]
    return [run.returncode for run in runs], [err for _, err in outputs]


def check_race(dataset: Path, cache_dir: Path, reference: Path, wait: bool = False) -> tuple[int, ...]:
    """A race ends in a complete cache: with ``wait`` both runs succeed (the second finds the work done),
    without it the loser refuses in one line naming the winner (or the two did not overlap)."""
    codes, errors = race(dataset, cache_dir, *(["checks.lock_wait_s=120"] if wait else []))
    assert codes.count(0) == 2 if wait else 0 in codes, errors
    for code, err in zip(codes, errors):
        if code:  # it never half-writes
            assert code == 2 and len(err.strip().splitlines()) == 1, err
            assert "is in use by `weakcell cache` (pid" in err
    assert_same_cache(cache_dir, reference)  # every image, every cell, no skip
    return tuple(sorted(codes))


def test_two_cache_runs_racing_lose_nothing(dataset, tmp_path, reference_cache):
    check_race(dataset, tmp_path / "refuse", reference_cache)
    check_race(dataset, tmp_path / "wait", reference_cache, wait=True)


@pytest.mark.slow
def test_two_cache_runs_racing_many_times(dataset, tmp_path, reference_cache):
    """``WEAKCELL_RACE_REPS`` (default 20) races, every other one with ``checks.lock_wait_s``; prints how
    they ended."""
    outcomes: dict[str, int] = {}
    repetitions = int(os.environ.get("WEAKCELL_RACE_REPS", "20"))
    for repetition in range(repetitions):
        wait = repetition % 2 == 1
        codes = check_race(dataset, tmp_path / f"race{repetition}", reference_cache, wait)
        ending = f"{'wait' if wait else 'refuse'} {codes}"
        outcomes[ending] = outcomes.get(ending, 0) + 1
    print(f"\n{repetitions} races, mode and exit codes -> count: {outcomes}; every cache complete")


# -- 2. output faults stop the stage ----------------------------------------------------------------------


def inject_rename_fault(monkeypatch, folder: Path, code: int) -> None:
    """Every atomic write ends in a rename: fail those into ``folder`` with ``code``."""
    real = os.replace

    def faulty(src, dst, *args, **kwargs):
        if Path(dst).parent == folder:
            raise OSError(code, os.strerror(code), str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", faulty)


@pytest.mark.parametrize(
    ("folder", "code", "fix"),
    [
        ("masks", errno.EACCES, "writable"),
        ("masks", errno.ENOSPC, "free space"),
        ("shards", errno.ENOSPC, "free space"),
        ("shards", errno.EROFS, "read-only"),
    ],
)
def test_output_faults_stop_the_cache_and_skip_nothing(
    dataset, tmp_path, reference_cache, monkeypatch, folder, code, fix
):
    cfg = load_config(None, cache_args(dataset, tmp_path / "cache"))
    inject_rename_fault(monkeypatch, cfg.cache_dir / folder, code)
    with pytest.raises(OutputError) as raised:
        build.run(cfg)
    message = str(raised.value)
    assert len(message.splitlines()) == 1 and f"cannot write {cfg.cache_dir / folder}" in message
    assert os.strerror(code) in message and fix in message
    # no image was marked as skipped, and no finished cache claims to be complete
    assert not (cfg.cache_dir / "cells.parquet").exists() and not (cfg.cache_dir / "skipped.csv").exists()
    for index in (cfg.cache_dir / "shards").glob("*.images.parquet"):
        assert (pd.read_parquet(index)["status"] == "ok").all()
    monkeypatch.undo()  # the machine is fixed: the next run finishes the same cache
    build.run(cfg)
    assert_same_cache(cfg.cache_dir, reference_cache)
    assert not list(cfg.cache_dir.rglob("*.tmp"))


def _namespaces_allow(*flags: str) -> str | None:
    """None when ``unshare`` with ``flags`` works here, else why not (the skip reason)."""
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = subprocess.run(["unshare", *flags, "true"], capture_output=True, text=True)
    return (
        None
        if probe.returncode == 0
        else f"unshare {' '.join(flags)} is not allowed here: {probe.stderr.strip()}"
    )


def as_unprivileged() -> tuple[str, ...]:
    """The command prefix that makes permission bits bind: nothing for a normal user, a user namespace
    for root (there it owns nothing: chmod stops it like anyone else)."""
    if os.geteuid() != 0:
        return ()
    reason = _namespaces_allow("-U")
    if reason:
        pytest.skip(f"root ignores permissions and {reason}")
    return ("unshare", "-U")


@pytest.mark.parametrize("where", ["masks", "shards", "."])
def test_an_unwritable_cache_folder_fails_the_stage(dataset, tmp_path, where):
    prefix = as_unprivileged()
    cache_dir = tmp_path / "cache"
    for sub in ("masks", "shards", "parts"):
        (cache_dir / sub).mkdir(parents=True)
    (cache_dir / LOCK_FILE).touch()  # the lock file itself stays writable
    target = cache_dir / where
    target.chmod(0o555)
    try:
        result = run_stage(weakcell_command("cache", *cache_args(dataset, cache_dir)), prefix)
    finally:
        target.chmod(0o755)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "skipped" not in result.stdout
    line = result.stderr.strip().splitlines()[-1]  # the lines before it are the progress bar's
    assert line.startswith(f"error: cannot write {target}/")
    assert "Permission denied" in line and "writable" in line


def test_a_full_disk_fails_the_cache_and_skips_nothing(dataset, tmp_path, reference_cache):
    reason = _namespaces_allow("-rm")
    if reason:
        pytest.skip(reason)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    command = " ".join(weakcell_command("cache", *cache_args(dataset, cache_dir)))
    # a disk of 8 pages: the lock, the config and a few masks fit, not the whole cache
    script = f"mount -t tmpfs -o size=32k tmpfs {cache_dir} && {command}"
    result = run_stage(["sh", "-c", script], ("unshare", "-rm"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "skipped" not in result.stdout
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot write {cache_dir}/")
    assert "No space left on device" in line and "free space" in line


@pytest.mark.parametrize(("stage", "code"), [("train", errno.EACCES), ("infer", errno.ENOSPC)])
def test_output_faults_stop_training_and_inference(tiny_run, tmp_path, monkeypatch, capsys, stage, code):
    cfg, _ = tiny_run
    args = [f"paths.root={cfg.paths.root}", *TINY, f"name=faulty-{stage}"]
    if stage == "train":
        args.append(f"paths.runs={tmp_path}")
        folder = tmp_path / f"faulty-{stage}"
    else:
        from weakcell import thresholds as thresholds_stage

        thresholds_stage.run(cfg)
        args += [f"paths.submissions={tmp_path}", f"infer.models={cfg.name}"]
        folder = tmp_path / f"faulty-{stage}"
    inject_rename_fault(monkeypatch, folder, code)
    capsys.readouterr()
    assert main([stage, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: cannot write {folder}/")
    assert os.strerror(code) in err and ("writable" if code == errno.EACCES else "free space") in err


# -- 3. infer publishes its files as one set ----------------------------------------------------------------


def test_a_killed_infer_never_leaves_a_mismatched_pair(tiny_run, tmp_path, monkeypatch):
    from weakcell import infer as infer_stage
    from weakcell import thresholds as thresholds_stage

    cfg, _ = tiny_run
    thresholds_stage.run(cfg)
    submissions = tmp_path / "submissions"
    first = cfg.model_copy(
        update={
            "paths": cfg.paths.model_copy(update={"submissions": str(submissions)}),
            "infer": cfg.infer.model_copy(update={"tta": [0]}),  # one view: the test runs infer 5 times
        }
    )
    second = first.model_copy(update={"infer": first.infer.model_copy(update={"image_power": 1.0})})
    out_dir = infer_stage.run(first)
    before = {name: (out_dir / name).read_bytes() for name in infer_stage.OUTPUT_FILES}

    # killed while writing the image-level file: the previous pair stays, whole and matching
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(infer_stage, "write_image_level", killed)
    with pytest.raises(KeyboardInterrupt):
        infer_stage.run(second)
    monkeypatch.undo()
    assert {name: (out_dir / name).read_bytes() for name in infer_stage.OUTPUT_FILES} == before
    from weakcell.submission import check_published

    check_published(out_dir / "cell_level.csv")

    # killed between two renames of the publication: the record no longer matches, and every check refuses
    real = os.replace

    def replace_then_die(src, dst, *args, **kwargs):
        if Path(dst) == out_dir / "image_level.csv":
            raise KeyboardInterrupt
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        infer_stage.run(second)
    monkeypatch.undo()
    assert (out_dir / "cell_level.csv").read_bytes() != before["cell_level.csv"]
    assert (out_dir / "image_level.csv").read_bytes() == before["image_level.csv"]
    with pytest.raises(ValueError, match=r"is not the file .* published .* rerun `make infer`"):
        check_published(out_dir / "cell_level.csv")
    assert main(["validate", str(out_dir / "image_level.csv"), "--published"]) == 2

    # a kill also leaves temporaries (hidden ones included): the next run removes them, then publishes
    (out_dir / ".cell_level.csv.x1y2z3.tmp").write_text("")
    (out_dir / "pred_cell.parquet.tmp").write_text("")
    infer_stage.run(second)
    assert not list(out_dir.glob("*.tmp")) and not (out_dir / infer_stage.STAGING_DIR).exists()
    check_published(out_dir / "image_level.csv")
    # byte-identical to an undisturbed run of the same settings
    clean = infer_stage.run(
        second.model_copy(update={"infer": second.infer.model_copy(update={"output": "clean"})})
    )
    for name in infer_stage.OUTPUT_FILES:
        assert (out_dir / name).read_bytes() == (clean / name).read_bytes(), name


def test_submit_checks_the_published_set_and_the_sample(tiny_run, tmp_path, capsys):
    from weakcell import infer as infer_stage
    from weakcell import thresholds as thresholds_stage

    cfg, _ = tiny_run
    thresholds_stage.run(cfg)
    root = cfg.paths.root
    args = [
        f"paths.root={root}",
        *TINY,
        f"paths.submissions={tmp_path}",
        "kaggle.owner=tester",
        "kaggle.dry_run=true",
    ]
    args += [f"paths.kernels={tmp_path / 'kernels'}", "kaggle.variants=[inference]"]
    args += [f"kaggle.datasets_dir={tmp_path / 'dist'}"]
    assert main(["weights-dataset", *args]) == 0  # submit compares it with the kernel and the run
    assert main(["kernels", *args]) == 0
    script = (tmp_path / "kernels" / "inference").glob("*.py")
    text = next(script).read_text()
    assert '"--sample", str(sample), "--published"' in text
    out_dir = infer_stage.run(
        cfg.model_copy(update={"paths": cfg.paths.model_copy(update={"submissions": str(tmp_path)})})
    )
    capsys.readouterr()
    assert main(["submit", *args]) == 0
    assert "is valid" in capsys.readouterr().out
    (out_dir / "cell_level.csv").write_text((out_dir / "cell_level.csv").read_text() + "\n")
    assert main(["submit", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cell_level.csv is not the file" in err


# -- 4. labelled images the cache lacks ---------------------------------------------------------------------


def test_missing_images_are_counted_by_reason():
    from weakcell.train import missing_images

    images = pd.DataFrame(
        {
            "image_id": ["a", "b", "c", "t"],
            "split": ["train", "train", "train", "test"],
            "n_cells": [4, 0, 0, 0],
            "status": ["ok", "ok", "skipped", "ok"],
        }
    )
    missing = missing_images(["a", "b", "c", "d", "t"], images)  # "t" is cached, but as a test image
    assert (missing.without_cells, missing.failed, missing.not_cached) == (["b"], ["c"], ["d", "t"])
    assert missing.count == 4 and missing.share == pytest.approx(4 / 5)
    record = missing.record()
    assert record["labelled"] == 5 and record["not_cached"] == 2 and record["examples"]["failed"] == ["c"]


def _cache_lacking(cfg, tmp_path: Path, lost: int, failed: int):
    """A copy of the tiny run's cache whose images table has lost ``lost`` training images and marks
    ``failed`` more as skipped (their cells gone), as an interrupted or raced cache would."""
    copy = tmp_path / "cache"
    shutil.copytree(cfg.cache_dir, copy)
    images = pd.read_parquet(copy / "images.parquet")
    train_ids = images.loc[images["split"] == "train", "image_id"].tolist()
    gone, broken = train_ids[:lost], train_ids[lost : lost + failed]
    images = images[~images["image_id"].isin(gone)].copy()
    images.loc[images["image_id"].isin(broken), ["status", "n_cells"]] = ["skipped", 0]
    images.to_parquet(copy / "images.parquet", index=False)
    cells = pd.read_parquet(copy / "cells.parquet")
    cells[~cells["image_id"].isin(gone + broken)].to_parquet(copy / "cells.parquet", index=False)
    return cfg.model_copy(
        update={
            "name": "lacking",
            "cache": cfg.cache.model_copy(update={"dir": str(copy)}),
            "paths": cfg.paths.model_copy(update={"runs": str(tmp_path / "runs")}),
        }
    )


def test_train_and_refine_refuse_a_cache_that_lacks_images(tiny_run, tmp_path, monkeypatch, capsys):
    import json

    from weakcell import refine as refine_stage
    from weakcell import train as train_stage

    cfg, _ = tiny_run
    lacking = _cache_lacking(cfg, tmp_path, lost=1, failed=1)  # 2 of the 9 labelled images
    n_labelled = len(pd.read_csv(cfg.data_dir / "train.csv"))
    expected = f"2 of {n_labelled} labelled training images give no cells: 0 without cells, 1 failed to read or segment, 1 not cached"
    with pytest.raises(ValueError, match=r"checks\.max_missing_share") as raised:
        train_stage.run(lacking)
    assert expected in str(raised.value) and len(str(raised.value).splitlines()) == 1
    assert not (lacking.run_dir / "fold0").exists()
    refining = lacking.model_copy(update={"refine": lacking.refine.model_copy(update={"rounds": 1})})
    with pytest.raises(ValueError, match=r"checks\.max_missing_share") as raised:
        refine_stage.run(refining)
    assert expected in str(raised.value) and str(raised.value).startswith("refine:")

    # told to go on, training says so and records the count and why in run.json
    monkeypatch.setattr(train_stage, "train_round", lambda *args, **kwargs: {})
    allowed = lacking.model_copy(
        update={"checks": lacking.checks.model_copy(update={"max_missing_share": 0.25})}
    )
    train_stage.run(allowed)
    assert expected in capsys.readouterr().out
    record = json.loads((allowed.run_dir / "run.json").read_text())["missing_images"]
    assert (record["labelled"], record["missing"], record["failed"], record["not_cached"]) == (
        n_labelled,
        2,
        1,
        1,
    )


# -- 5. one line naming the file and the fix -----------------------------------------------------------------


class Payload:
    """Unpickling it would run code of the file's choosing."""

    def __reduce__(self):
        return (print, ("pickled code ran",))


def _truncated(path: Path) -> None:
    torch.save({"format": 1, "model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the corrupt file's header
@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(b"\x80\x04 this is not a checkpoint"),
        lambda p: torch.save({"format": 1, "extra": Payload()}, p),
        _truncated,
    ],
    ids=["corrupt", "hostile", "truncated"],
)
def test_a_damaged_resume_checkpoint_is_one_line(tiny_run, tmp_path, capsys, damage):
    cfg, _ = tiny_run
    last = tmp_path / "runs" / "damaged" / "fold0" / "cell" / "last.pt"
    last.parent.mkdir(parents=True)
    damage(last)
    args = [f"paths.root={cfg.paths.root}", *TINY, "name=damaged", f"paths.runs={tmp_path / 'runs'}"]
    assert main(["train", *args]) == 2
    out = capsys.readouterr()
    err = out.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {last} ")
    assert "delete" in err and "FORCE=1" in err
    assert "weights_only" not in err and "pickled code ran" not in out.out


def test_an_empty_tta_list_is_a_config_error(tiny_run, capsys):
    cfg, _ = tiny_run
    assert main(["infer", f"paths.root={cfg.paths.root}", *TINY, "infer.tta=[]"]) == 2
    err = capsys.readouterr().err
    assert "infer.tta" in err and "at least 1 item" in err and "Traceback" not in err
    assert main(["infer", f"paths.root={cfg.paths.root}", *TINY, "infer.tta=[8]"]) == 2
    err = capsys.readouterr().err
    assert "infer.tta.0" in err and "(got 8)" in err and len(err.strip().splitlines()) == 1


# -- 6. what validate checks ---------------------------------------------------------------------------------


def test_validate_says_what_it_cannot_check_without_the_sample(tmp_path, capsys):
    from weakcell.submission import write_cell_level

    sample = pd.DataFrame(
        {"ID": ["a", "b", "c"], "ImageWidth": [8, 6, 4], "ImageHeight": [4, 4, 4], "PredictionString": ""}
    )
    masks = {
        i: np.ones((h, w), np.int32)
        for i, w, h in sample[["ID", "ImageWidth", "ImageHeight"]].itertuples(index=False)
    }
    preds = pd.DataFrame({"image_id": ["a", "b", "c"], "cell_id": 1, **{f"p_{c}": 0.5 for c in range(19)}})
    path = write_cell_level(preds, masks.__getitem__, sample, tmp_path / "cell_level.csv")
    sample_path = tmp_path / "sample.csv"
    sample.to_csv(sample_path, index=False)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)

    dropped = tmp_path / "dropped.csv"
    frame.drop(index=1).to_csv(dropped, index=False)
    swapped = tmp_path / "swapped.csv"  # 8x4 read as 4x8: the same pixel count, so every mask still decodes
    frame.assign(ImageWidth=["4", "6", "4"], ImageHeight=["8", "4", "4"]).to_csv(swapped, index=False)
    for broken in (dropped, swapped):
        capsys.readouterr()
        assert main(["validate", str(broken)]) == 0
        out = capsys.readouterr().out
        assert "NOT checked without --sample" in out and "order" in out and "width and height" in out
        assert main(["validate", str(broken), "--sample", str(sample_path)]) == 2
    assert main(["validate", str(path), "--sample", str(sample_path)]) == 0
    assert "NOT checked" not in capsys.readouterr().out
