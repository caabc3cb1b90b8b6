"""The training engine on a toy problem: learning, exact gradient accumulation, the schedule, EMA, exact
resume after a crash, weights-only loading, bf16 autocast on CPU, logs, idempotence and DDP (slow)."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from weakcell.config import TrainConfig
from weakcell.engine import TIMING_COLUMNS, ModelEma, cosine_lr, fit, load_checkpoint, predict
from weakcell.weights import WeightsError

DIM, CLASSES, SAMPLES = 8, 3, 64
TEACHER = torch.randn(DIM, CLASSES, generator=torch.Generator().manual_seed(1234))  # (DIM, CLASSES)


class Toy(nn.Module):
    """A two-layer classifier with the engine's contract: ``forward(batch) -> {"loss", "logits"}``."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(DIM, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, CLASSES))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.net(batch["x"])
        return {"loss": F.cross_entropy(logits.float(), batch["y"]), "logits": logits}


class Samples(Dataset):
    """One sample per ``__getitem__`` (collated by the engine); labels are learnable from x."""

    def __init__(self, n: int = SAMPLES, seed: int = 0) -> None:
        self.x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))
        self.y = (self.x @ TEACHER).argmax(1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[position], "y": self.y[position]}


class Batches(Samples):
    """Whole batches per ``__getitems__`` (the crop cache's fast path), optionally with random jitter drawn
    from torch's and numpy's global RNGs, as augmentations do."""

    def __init__(self, n: int = SAMPLES, seed: int = 0, jitter: bool = False) -> None:
        super().__init__(n, seed)
        self.jitter = jitter

    def __getitems__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        x = self.x[positions]
        if self.jitter:
            x = x + 0.1 * torch.randn_like(x) + torch.from_numpy(np.random.normal(0, 0.1, x.shape)).float()  # noqa: NPY002
        return {"x": x, "y": self.y[positions], "index": torch.tensor(positions)}


def config(**overrides) -> TrainConfig:
    base = dict(
        epochs=3,
        batch_size=8,
        lr=0.05,
        warmup_epochs=0.5,
        device="cpu",
        amp="off",
        channels_last=False,
        checkpoint_every=0,
    )
    return TrainConfig(**(base | overrides))


def toy(seed: int = 0, dropout: float = 0.0) -> Toy:
    torch.manual_seed(seed)
    return Toy(dropout)


def accuracy(outputs: dict[str, np.ndarray], data: Samples) -> dict[str, float]:
    return {"accuracy": float((outputs["logits"].argmax(1) == data.y.numpy()[outputs["index"]]).mean())}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops on a shared 2-core machine run faster, and steadier, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def test_learns_and_writes_logs(tmp_path: Path) -> None:
    train, val = Samples(256, seed=0), Batches(64, seed=1)
    result = fit(
        toy(),
        train,
        val,
        config(epochs=4, batch_size=16),
        tmp_path,
        seed=0,
        evaluate=lambda outputs: accuracy(outputs, val),
        batch_keys=("index",),
    )
    log = pd.read_csv(tmp_path / "epochs.csv")
    assert list(log.columns) == ["epoch", "step", "lr", "train_loss", "val_loss", "accuracy", *TIMING_COLUMNS]
    assert log["epoch"].tolist() == [1, 2, 3, 4] and log["step"].iloc[-1] == 4 * 256 // 16
    assert log["train_loss"].iloc[-1] < 0.5 * log["train_loss"].iloc[0]
    assert log["val_loss"].iloc[-1] < log["val_loss"].iloc[0]
    assert result.metrics["accuracy"] > 0.85
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(torch.load(result.weights, weights_only=True)) == set(Toy().state_dict())


def test_grad_accumulation_equals_one_full_batch(tmp_path: Path, deterministic) -> None:
    # AdamW is blind to a gradient's scale, so the weights alone would not catch a wrong 1/grad_accum:
    # compare the gradient handed to the optimizer at the first step as well.
    weights, first_grads = {}, {}
    for accum in (1, 4):
        model, seen = toy(), []
        for param in model.parameters():  # fires after each micro-batch's backward added into .grad
            param.register_post_accumulate_grad_hook(lambda p, seen=seen: seen.append(p.grad.clone()))
        result = fit(model, Batches(), None, config(grad_accum=accum), tmp_path / f"a{accum}", seed=3)
        weights[accum] = torch.load(result.weights, weights_only=True)
        params = len(list(model.parameters()))
        first_grads[accum] = seen[(accum - 1) * params : accum * params]  # after the step's last micro-batch
    for full, accumulated in zip(first_grads[1], first_grads[4]):
        torch.testing.assert_close(accumulated, full, rtol=0, atol=1e-7)
    for name, value in weights[1].items():
        torch.testing.assert_close(weights[4][name], value, rtol=0, atol=1e-6)


def test_cosine_schedule_with_warmup(tmp_path: Path) -> None:
    peak, total, warmup = 0.1, 100, 10
    assert cosine_lr(0, total, warmup, peak) == pytest.approx(peak / warmup)
    assert cosine_lr(4, total, warmup, peak) == pytest.approx(peak * 5 / 10)
    assert cosine_lr(9, total, warmup, peak) == pytest.approx(peak)
    assert cosine_lr(10, total, warmup, peak) == pytest.approx(peak)  # cosine starts at the peak
    assert cosine_lr(55, total, warmup, peak) == pytest.approx(peak / 2)  # half way down
    assert cosine_lr(99, total, warmup, peak) == pytest.approx(peak * (1 + math.cos(math.pi * 89 / 90)) / 2)
    assert cosine_lr(5, total, 0, peak) == pytest.approx(peak * (1 + math.cos(math.pi * 5 / 100)) / 2)

    # fit steps it per optimizer step: 8 steps per epoch, warm-up 0.5 epoch = 4 steps, 24 steps in all
    seen = []
    cfg = config(warmup_epochs=0.5)
    model = toy()
    result = fit(model, Batches(), None, cfg, tmp_path, seed=0, on_step=lambda step: seen.append(step))
    assert seen == list(range(1, 25))
    expected = [0.05 * 0.5 * (1 + math.cos(math.pi * (8 * e - 1 - 4) / 20)) for e in (1, 2, 3)]
    assert [row["lr"] for row in result.history] == pytest.approx(expected)


def test_ema_weights_are_exported(tmp_path: Path) -> None:
    plain = fit(toy(), Batches(), None, config(), tmp_path / "plain", seed=0)
    averaged = fit(toy(), Batches(), None, config(ema=0.9), tmp_path / "ema", seed=0)
    exported = torch.load(averaged.weights, weights_only=True)
    checkpoint = load_checkpoint(tmp_path / "ema" / "last.pt")
    raw = torch.load(plain.weights, weights_only=True)
    for name, value in exported.items():
        assert torch.equal(value, checkpoint["ema"][name])
        assert torch.equal(checkpoint["model"][name], raw[name])  # EMA does not touch training
        assert not torch.equal(value, raw[name])

    # one update: ema <- d * ema + (1 - d) * model, with d warmed up as min(decay, (1 + t) / (10 + t))
    source = toy(1)
    ema = ModelEma(toy(2), decay=0.5)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    ema.update(source, step=100)
    for name, value in ema.module.state_dict().items():
        torch.testing.assert_close(value, 0.5 * before[name] + 0.5 * source.state_dict()[name])


class Crash(RuntimeError):
    pass


def test_exact_resume_after_a_crash(tmp_path: Path, deterministic) -> None:
    # dropout + jitter from torch's and numpy's RNGs, EMA, accumulation: every piece of state must resume
    cfg = config(epochs=3, batch_size=16, grad_accum=2, ema=0.9, checkpoint_every=3)
    data, val = Batches(64, jitter=True), Batches(32, seed=1)
    whole = fit(toy(dropout=0.3), data, val, cfg, tmp_path / "whole", seed=7)

    def crash_at_step_7(step: int) -> None:  # 4 steps per epoch: last checkpoint at step 6 = epoch 2, step 2
        if step == 7:
            raise Crash

    with pytest.raises(Crash):
        fit(toy(dropout=0.3), data, val, cfg, tmp_path / "split", seed=7, on_step=crash_at_step_7)
    checkpoint = load_checkpoint(tmp_path / "split" / "last.pt")
    assert (checkpoint["epoch"], checkpoint["step_in_epoch"]) == (1, 2)
    torch.manual_seed(123)  # a different process state before the restart must not matter
    resumed = fit(toy(seed=5, dropout=0.3), data, val, cfg, tmp_path / "split", seed=7)

    assert resumed.resumed
    expected, got = (torch.load(r.weights, weights_only=True) for r in (whole, resumed))
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    final = [load_checkpoint(tmp_path / run / "last.pt") for run in ("whole", "split")]
    for name, value in final[0]["model"].items():
        assert torch.equal(final[1]["model"][name], value), name

    def untimed(history):
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in history]

    assert untimed(resumed.history) == untimed(whole.history)
    logs = [
        pd.read_csv(tmp_path / run / "epochs.csv").drop(columns=list(TIMING_COLUMNS))
        for run in ("whole", "split")
    ]
    pd.testing.assert_frame_equal(logs[0], logs[1])


def test_resume_refuses_changed_settings(tmp_path: Path) -> None:
    fit(toy(), Batches(), None, config(epochs=1), tmp_path, seed=0)
    with pytest.raises(ValueError, match=r"train.lr: 0.05 -> 0.1"):
        fit(toy(), Batches(), None, config(epochs=1, lr=0.1), tmp_path, seed=0)
    with pytest.raises(ValueError, match="seed: 0 -> 1"):
        fit(toy(), Batches(), None, config(epochs=1), tmp_path, seed=1)


def test_a_checkpoint_from_before_a_new_setting_resumes_at_its_default(tmp_path: Path) -> None:
    """train.augment joined the schema after checkpoints existed: one without it had the default and resumes;
    one that recorded another value does not."""

    def crash_at_step_3(step: int) -> None:
        if step == 3:
            raise Crash

    cfg = config(epochs=2, checkpoint_every=2)
    with pytest.raises(Crash):
        fit(toy(), Batches(), None, cfg, tmp_path / "old", seed=0, on_step=crash_at_step_3)
    path = tmp_path / "old" / "last.pt"
    state = torch.load(path, weights_only=True)
    del state["train"]["augment"]
    torch.save(state, path)
    assert fit(toy(), Batches(), None, cfg, tmp_path / "old", seed=0).resumed

    with pytest.raises(Crash):
        fit(toy(), Batches(), None, cfg, tmp_path / "other", seed=0, on_step=crash_at_step_3)
    path = tmp_path / "other" / "last.pt"
    state = torch.load(path, weights_only=True)
    state["train"]["augment"] = []
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"train.augment: \[\] -> \[\{'name': 'symmetries'\}"):
        fit(toy(), Batches(), None, cfg, tmp_path / "other", seed=0)


def test_finished_run_is_skipped_unless_forced(tmp_path: Path) -> None:
    first = fit(toy(), Batches(), None, config(epochs=1), tmp_path, seed=0)
    stamp = first.weights.stat().st_mtime_ns
    again = fit(toy(seed=9), Batches(), None, config(epochs=1), tmp_path, seed=0)
    assert again.skipped and again.history == first.history
    assert first.weights.stat().st_mtime_ns == stamp
    forced = fit(toy(seed=9), Batches(), None, config(epochs=1), tmp_path, seed=0, force=True)
    assert not forced.skipped and first.weights.stat().st_mtime_ns != stamp


class Payload:
    """A custom class: unpickling it would run code of the checkpoint's choosing."""

    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_checkpoints_load_weights_only(tmp_path: Path, capsys) -> None:
    torch.save({"model": {}, "extra": Payload()}, tmp_path / "last.pt")
    with pytest.raises(WeightsError, match="weights-only load refuses"):
        load_checkpoint(tmp_path / "last.pt")
    with pytest.raises(WeightsError, match="weights-only load refuses"):
        fit(toy(), Batches(), None, config(epochs=1), tmp_path, seed=0)
    assert "pickled code ran" not in capsys.readouterr().out


class TinyConv(nn.Module):
    """Records the autocast state and memory format it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.head = nn.Linear(8, CLASSES)
        self.seen: list[tuple[bool, torch.dtype, bool]] = []

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images = batch["crops"].float() / 255  # (B, 4, S, S) uint8 -> [0, 1]
        features = self.conv(images)
        channels_last = batch["crops"].is_contiguous(memory_format=torch.channels_last)
        self.seen.append((torch.is_autocast_enabled("cpu"), features.dtype, channels_last))
        logits = self.head(features.mean((2, 3)))
        return {"loss": F.cross_entropy(logits.float(), batch["y"]), "logits": logits}


class Crops(Dataset):
    def __init__(self, n: int = 16) -> None:
        self.crops = torch.randint(0, 256, (n, 4, 6, 6), dtype=torch.uint8)
        self.y = torch.arange(n) % CLASSES

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        return {"crops": self.crops[position], "y": self.y[position]}


def test_bf16_autocast_and_channels_last_on_cpu(tmp_path: Path) -> None:
    model, data = TinyConv(), Crops()
    cfg = config(epochs=1, amp="bf16", channels_last=True)
    result = fit(model, data, data, cfg, tmp_path, seed=0)
    assert set(model.seen) == {(True, torch.bfloat16, True)}
    assert np.isfinite(result.metrics["val_loss"]) and np.isfinite(result.metrics["train_loss"])
    outputs = predict(model, data, cfg)
    assert outputs["logits"].dtype == np.float32 and outputs["logits"].shape == (16, CLASSES)


def test_predict_keeps_data_order(tmp_path: Path) -> None:
    model, data = toy(), Batches(21)
    outputs = predict(model, data, config(batch_size=4), batch_keys=("index",))
    np.testing.assert_array_equal(outputs["index"], np.arange(21))
    with torch.no_grad():
        expected = model.net(data.x).numpy()
    np.testing.assert_allclose(outputs["logits"], expected, atol=1e-6)
    assert outputs["loss"].shape == () and outputs["loss"] == pytest.approx(
        F.cross_entropy(torch.from_numpy(expected), data.y).item(), abs=1e-6
    )


class WorkerStamped(Batches):
    """Each batch says which process loaded it."""

    def __getitems__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        return super().__getitems__(positions) | {"pid": torch.full((len(positions),), os.getpid())}


def test_validation_reuses_its_worker_processes(tmp_path: Path) -> None:
    """Validating every epoch must not start ``workers`` new processes each time (a second a fit on a GPU
    machine); the curves are drawn once for a short fit, after its last epoch."""
    seen: list[set[int]] = []

    def stamp(outputs: dict[str, np.ndarray]) -> dict[str, float]:
        seen.append(set(outputs["pid"].tolist()))
        return {}

    fit(
        toy(),
        Batches(64),
        WorkerStamped(32, seed=1),
        config(epochs=3, workers=2),
        tmp_path,
        seed=0,
        evaluate=stamp,
        batch_keys=("pid",),
    )
    assert len(seen) == 3 and os.getpid() not in set.union(*seen)
    assert len(set.union(*seen)) <= 2, f"validation loaded batches in {len(set.union(*seen))} processes"
    assert (tmp_path / "curves.png").is_file()


DDP_SCRIPT = """
import sys
from tests.test_engine import Batches, config, toy
from weakcell.engine import fit

fit(toy(), Batches(), Batches(16, seed=1), config(**{cfg}), sys.argv[1], seed=3)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path: Path) -> None:
    settings = dict(epochs=2, batch_size=8, grad_accum=2)
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT).format(cfg=settings))
    repo = Path(__file__).resolve().parents[1]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    command += [f"--master_port={free_port()}", str(script), str(tmp_path / "ddp")]
    run = subprocess.run(command, env=env, cwd=repo, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]

    single = fit(toy(), Batches(), Batches(16, seed=1), config(**settings), tmp_path / "one", seed=3)
    ddp = torch.load(tmp_path / "ddp" / "model.pt", weights_only=True)
    for name, value in torch.load(single.weights, weights_only=True).items():
        torch.testing.assert_close(ddp[name], value, rtol=0, atol=1e-5)
    logs = [pd.read_csv(tmp_path / run / "epochs.csv") for run in ("ddp", "one")]
    for column in ("train_loss", "val_loss"):
        np.testing.assert_allclose(logs[0][column], logs[1][column], atol=1e-5)


class SeededBatches(Batches):
    """Batches whose jitter comes from ``batch_rng(positions)``, as the crop cache's does: safe to read in
    the engine's prefetch thread."""

    thread_safe = True

    def __getitems__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        from weakcell.cache.loader import batch_rng

        x = (
            self.x[positions]
            + torch.from_numpy(batch_rng(positions).normal(0, 0.1, (len(positions), DIM))).float()
        )
        return {"x": x, "y": self.y[positions], "index": torch.tensor(positions)}


def test_prefetch_overlaps_reading_without_changing_a_bit(tmp_path: Path, deterministic, monkeypatch) -> None:
    """Issue 26: reading the next batch in a thread while the model computes; dropout draws from torch's RNG
    in the main thread meanwhile, and the weights, the log and an exact resume are those of a serial run."""
    import threading

    from weakcell.epoch_log import format_duration

    readers: set[str] = set()
    original = SeededBatches.__getitems__

    def spy(self, positions):
        readers.add(threading.current_thread().name)
        return original(self, positions)

    monkeypatch.setattr(SeededBatches, "__getitems__", spy)
    data, val = SeededBatches(64), Batches(32, seed=1)
    serial = fit(toy(dropout=0.3), data, val, config(prefetch=False), tmp_path / "serial", seed=7)
    assert readers == {"MainThread"}
    readers.clear()
    cfg = config(checkpoint_every=3)
    overlapped = fit(toy(dropout=0.3), data, val, cfg, tmp_path / "overlapped", seed=7)
    assert readers and all(name.startswith("weakcell-prefetch") for name in readers)
    got = torch.load(overlapped.weights, weights_only=True)
    for name, value in torch.load(serial.weights, weights_only=True).items():
        assert torch.equal(got[name], value), name

    def crash_at_step_5(step: int) -> None:
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        fit(toy(dropout=0.3), data, val, cfg, tmp_path / "split", seed=7, on_step=crash_at_step_5)
    resumed = fit(toy(seed=3, dropout=0.3), data, val, cfg, tmp_path / "split", seed=7)
    got = torch.load(resumed.weights, weights_only=True)
    for name, value in torch.load(serial.weights, weights_only=True).items():
        assert torch.equal(got[name], value), name
    assert format_duration(42) == "42 s" and format_duration(600) == "10.0 min"


def test_validation_every_few_epochs_and_an_estimate_after_the_first(tmp_path: Path, capsys) -> None:
    """Issue 26: a first run prints how long it still needs after its first epoch; validation, which only
    draws the curves, can run every few epochs (always after the last)."""
    data, val = Batches(64), Batches(32, seed=1)
    result = fit(
        toy(),
        data,
        val,
        config(epochs=5, validate_every=2),
        tmp_path,
        seed=0,
        evaluate=lambda outputs: accuracy(outputs, val),
        batch_keys=("index",),
    )
    validated = [
        row["epoch"] for row in result.history if "accuracy" in row and not math.isnan(row["accuracy"])
    ]
    assert validated == [2, 4, 5]
    out = capsys.readouterr().out
    assert "fit: epoch 1 of 5 took" in out and "left for" in out
    assert (tmp_path / "curves.png").is_file()
