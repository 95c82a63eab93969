"""Faults from outside the code, on files: a download cache keyed by its source, model files and checkpoints that
cannot be read, outputs that cannot be written or fill the disk (checked before the work, replaced together or not at
all), permissions that follow the umask, and `itm search --sheet` to a path it cannot write.

An unwritable path is made as a path under a regular file (`blocker/out`): that fails for root too, where a chmod
would not bite. A full disk is an `OSError(ENOSPC)` raised where the bytes are written.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import logging
import os
import pickle
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pydantic import TypeAdapter

from itm import atomic, commands
from itm.checkpoints import CHECKPOINT, PREVIOUS_CHECKPOINT
from itm.config import DetectorArchitecture, MatcherParams
from itm.data import download
from itm.data.download import fetch
from itm.data.records import read_dataset_json
from itm.data.splits import DataFolders
from itm.data.vocab import load_vocab
from itm.detect.saved import save_detector
from itm.errors import UserError
from itm.models import MatcherInputs, build_matcher
from itm.models.saved import CARD_FILE, MODEL_FILE, load_matcher, save_matcher
from itm.seeds import seed_path
from itm.stage_runner import run_stage
from itm.tracking import NullTracker
from itm.train import loop
from stages import regions
from tests.conftest import REPO, TINY_DETECTOR, TINY_SYNTHETIC
from tests.http_server import http_server_fixture  # noqa: F401 - provides the `http_server` fixture
from tests.test_convert import random_detector
from tests.test_detector_train import TRAINING, detector_interrupted_in_epoch
from tests.test_detector_train import _train as _train_detector
from tests.test_matcher_stages import _train, prepared, stop_after_second_checkpoint  # noqa: F401 - `prepared`: params, captions, oracle regions

CPU = torch.device("cpu")
DATA = b"first version " * 1000
OTHER = b"second version" * 1000


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _blocker(tmp_path: Path) -> Path:
    """A regular file: nothing can be written under it, whoever runs the test."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    return blocker


def _disk_full(path: object = None) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), None if path is None else str(path))


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line a failed command printed on stderr."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    delays: list[float] = []
    monkeypatch.setattr(download, "_sleep", delays.append)
    return delays


# --- 3: the download cache is keyed by the source ------------------------------------------------------------------


def test_a_new_url_with_the_same_file_name_is_downloaded_not_reused(http_server, tmp_path: Path) -> None:
    first = http_server.add("/v1/data.bin", DATA)
    second = http_server.add("/v2/data.bin", OTHER)
    assert fetch(first, tmp_path, progress=False).read_bytes() == DATA
    assert fetch(second, tmp_path, progress=False).read_bytes() == OTHER
    assert fetch(first, tmp_path, progress=False).read_bytes() == DATA  # each source keeps its own copy
    assert http_server.ranges("/v1/data.bin") == [None] and http_server.ranges("/v2/data.bin") == [None]


def test_a_copy_without_a_checksum_is_reused_for_its_url_but_never_called_verified(
    http_server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = http_server.add("/data.bin", DATA)
    with caplog.at_level(logging.INFO, logger="itm.data.download"):
        path = fetch(url, tmp_path, progress=False)
        assert fetch(url, tmp_path, progress=False) == path
    assert http_server.ranges("/data.bin") == [None]
    assert not [message for message in caplog.messages if "verified copy" in message]
    assert [message for message in caplog.messages if str(path) in message and "not verified" in message]


def test_a_copy_cached_by_file_name_alone_is_reused_only_when_its_checksum_verifies(
    http_server, tmp_path: Path
) -> None:
    """The cache's earlier layout (`<cache>/<file name>`): a download there is kept when the checksum proves it is
    the wanted file, and never taken on trust."""
    url = http_server.add("/new/data.bin", OTHER)
    (tmp_path / "data.bin").write_bytes(DATA)  # another URL's file of the same name
    assert fetch(url, tmp_path, progress=False).read_bytes() == OTHER
    assert http_server.ranges("/new/data.bin") == [None]

    verified = http_server.add("/verified/big.bin", DATA)
    (tmp_path / "big.bin").write_bytes(DATA)
    sha256 = hashlib.sha256(DATA).hexdigest()
    assert fetch(verified, tmp_path, sha256=sha256, progress=False).read_bytes() == DATA
    assert http_server.ranges("/verified/big.bin") == []


def test_a_full_disk_while_downloading_is_one_line_without_retrying(
    http_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _no_backoff: list[float]
) -> None:
    url = http_server.add("/data.bin", DATA)

    def full_disk(response: object, part: Path, *args: object) -> int:
        raise _disk_full(part)

    monkeypatch.setattr(download, "_stream", full_disk)
    with pytest.raises(UserError, match=r"data\.bin\.part: No space left on device") as raised:
        fetch(url, tmp_path, progress=False)
    assert url in str(raised.value) and "\n" not in str(raised.value)
    assert _no_backoff == [] and len(http_server.ranges("/data.bin")) == 1


# --- 8: model files and checkpoints that cannot be read -------------------------------------------------------------


def _saved_matcher(folder: Path) -> Path:
    """A small untrained VSE++ saved as the train stage saves one; returns its model.pt."""
    params = TypeAdapter(MatcherParams).validate_python({"kind": "vsepp", "embed_dim": 8, "word_dim": 8})
    matcher = build_matcher(params, MatcherInputs(6, 12))
    card = {"name": "vsepp", "kind": "vsepp", "params": params.model_dump(mode="json"), "seed": 0, "feature_dim": 6,
            "vocab_size": 12, "vocab_digest": "0" * 16}  # fmt: skip
    save_matcher(folder, matcher.state_dict(), card)
    return folder / MODEL_FILE


@pytest.mark.parametrize("damage", ["truncated", "not torch"])
def test_a_damaged_model_file_is_one_line_naming_it(tmp_path: Path, damage: str) -> None:
    path = _saved_matcher(tmp_path / "model")
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2] if damage == "truncated" else b"<html>Not Found</html>")
    with pytest.raises(UserError) as raised:
        load_matcher(tmp_path / "model", CPU)
    message = str(raised.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert "train stage" in message  # what to do


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_model_file_that_would_run_code_is_refused_without_running_it(tmp_path: Path) -> None:
    path = _saved_matcher(tmp_path / "model")
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self) -> tuple:
            return (Path.touch, (marker,))

    for protocol in (2, pickle.HIGHEST_PROTOCOL):  # torch's own, and one its weights-only unpickler cannot read
        torch.save({"state_dict": {}, "card": Payload()}, path, pickle_protocol=protocol)
        with pytest.raises(UserError, match=rf"^{path}: not a loadable trained matcher \(refused") as raised:
            load_matcher(tmp_path / "model", CPU)
        assert "weights_only` set to `False`" not in str(raised.value)  # torch's advice to load it unsafely
    assert not marker.exists()


def _detector_folder(folder: Path) -> Path:
    architecture = DetectorArchitecture(**TINY_DETECTOR)
    save_detector(folder, random_detector(architecture, 7, 5, seed=0), architecture, None, None, source={"kind": "x"})
    return folder


def test_the_detector_folder_is_not_taken_for_a_matcher(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    detector = _detector_folder(tmp_path / "models" / "detector")
    with pytest.raises(UserError, match=rf"^{detector / MODEL_FILE}: not a trained matcher"):
        load_matcher(detector, CPU)  # what `evaluate --model models/detector` reads
    with pytest.raises(SystemExit) as stopped:
        commands.main(["search", "--model", str(detector), "--text", "a red circle", "--dataset", str(tmp_path),
                       "--regions", str(tmp_path / "r"), "--captions", str(tmp_path / "c")])  # fmt: skip
    assert stopped.value.code == 2
    assert f"{detector}: the region detector's folder, not a trained matcher's" in _one_error_line(capsys)


def test_unreadable_checkpoints_are_reported_removed_and_training_starts_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Neither the checkpoint nor the one kept before it can be read: each is named, and training starts over."""
    current = tmp_path / CHECKPOINT
    current.write_bytes(b"PK\x03\x04 truncated")
    previous = tmp_path / PREVIOUS_CHECKPOINT
    previous.write_bytes(b"")
    matcher = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(matcher.parameters())
    with caplog.at_level(logging.INFO, logger="itm"):
        resumed = loop._resume(tmp_path, "fingerprint", matcher, optimizer, loop.gradient_scaler("fp32", CPU))
    assert resumed is None and not current.exists() and not previous.exists()
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert [message.split(":")[0] for message in warnings] == [str(current), str(previous)]
    assert "starting from the first epoch" in caplog.text


@pytest.mark.slow
def test_a_corrupt_checkpoint_resumes_from_the_one_kept_before_it(
    prepared: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Training stopped after its second epoch, whose checkpoint was then damaged: the re-run says so, resumes
    after the first epoch and ends as a whole run would (two epochs, both checkpoints gone)."""
    out, work = prepared / "models" / "corrupt", prepared / "work" / "train" / "corrupt"
    saved = stop_after_second_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _train(prepared, "vsepp", "--out", str(out), "--work", str(work))
    monkeypatch.setattr(loop, "_save", saved)
    checkpoint = work / CHECKPOINT
    checkpoint.write_bytes(checkpoint.read_bytes()[:4096])
    with caplog.at_level(logging.INFO, logger="itm"):
        _train(prepared, "vsepp", "--out", str(out), "--work", str(work))
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"{checkpoint}: ")
    assert "resuming after epoch 1" in caplog.text
    assert json.loads((out / CARD_FILE).read_text())["training"]["epochs"] == 2
    assert sorted(path.name for path in work.iterdir()) == ["run.json"]


@pytest.mark.slow
def test_a_damaged_detector_checkpoint_resumes_from_the_one_kept_before_it(
    tiny_synthetic: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The detector's training stopped in its third epoch and its last checkpoint was then cut short: the re-run
    names it, resumes after the first epoch and trains the second and third (it used to fail on every run)."""
    training = TRAINING.model_copy(update={"epochs": 3, "max_images": 16})
    with detector_interrupted_in_epoch(monkeypatch, 2):
        _train_detector(tiny_synthetic, tmp_path, NullTracker(), training)
    checkpoint = tmp_path / CHECKPOINT
    assert (tmp_path / PREVIOUS_CHECKPOINT).is_file()
    checkpoint.write_bytes(checkpoint.read_bytes()[:4096])
    tracker = NullTracker()
    with caplog.at_level(logging.INFO, logger="itm"):
        _train_detector(tiny_synthetic, tmp_path, tracker, training)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"{checkpoint}: not a loadable checkpoint")
    assert "resuming detector training after epoch 1" in caplog.text
    assert [step for _, step in tracker.metrics] == [2, 3]


# --- 9: unwritable outputs and a full disk --------------------------------------------------------------------------


def test_writability_is_checked_without_writing_anything(tmp_path: Path) -> None:
    from itm.atomic import check_writable

    blocker = _blocker(tmp_path)
    with pytest.raises(UserError, match=rf"^{blocker / 'metrics.json'}: cannot be written \({blocker} is a file"):
        check_writable(files=[tmp_path / "fine.json", blocker / "metrics.json"])
    (tmp_path / "reports").mkdir()
    with pytest.raises(UserError, match=rf"^{tmp_path / 'reports'}: is a folder"):
        check_writable(files=[tmp_path / "reports"])
    check_writable(files=[tmp_path / "new" / "deeper" / "m.json"], folders=[tmp_path / "out", tmp_path / "reports"])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["blocker", "reports"]


def test_a_full_disk_while_writing_an_output_is_one_line_and_keeps_the_earlier_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = tmp_path / "metrics.json"
    metrics.write_text("earlier")
    with pytest.raises(UserError) as raised, atomic.staged_file(metrics):
        raise _disk_full()
    assert str(raised.value).startswith(f"{metrics}: No space left on device")
    assert metrics.read_text() == "earlier" and sorted(tmp_path.iterdir()) == [metrics]


def test_a_full_disk_anywhere_in_a_stage_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    def stage(argv: object) -> None:
        raise _disk_full("data/work/train/vsepp/seed0/checkpoint.pt")

    with pytest.raises(SystemExit) as stopped:
        run_stage(stage, [])
    assert stopped.value.code == 2
    line = _one_error_line(capsys)
    assert "data/work/train/vsepp/seed0/checkpoint.pt: No space left on device" in line


def test_train_with_an_unwritable_out_stops_before_training(
    prepared: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fit(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained although --out cannot be written")

    monkeypatch.setattr("itm.train.run.fit", fit)
    out = _blocker(tmp_path) / "model"
    with pytest.raises(UserError, match=rf"^{out}: cannot be written"):
        _train(prepared, "vsepp", "--out", str(out), "--work", str(tmp_path / "work"))


@pytest.fixture
def precomputed(tmp_path: Path, tiny_synthetic: Path) -> Iterator[tuple[Path, list[str]]]:
    """params.yaml for regions from SCAN-style precomputed features, and the regions stage's arguments but for
    --metrics and --out; data/regions holds an earlier store."""
    precomp = tmp_path / "precomp"
    precomp.mkdir()
    records = read_dataset_json(tiny_synthetic / "dataset.json")
    rng = np.random.default_rng(0)
    for ours, scan in (("train", "train"), ("val", "dev"), ("test", "test")):
        split = [r for r in records if r.split == ours]
        np.save(precomp / f"{scan}_ims.npy", rng.standard_normal((len(split), 4, 8)).astype(np.float32))
        (precomp / f"{scan}_ids.txt").write_text("".join(f"{r.imgid}\n" for r in split))
        (precomp / f"{scan}_caps.txt").write_text("".join(f"{s.raw}\n" for r in split for s in r.sentences))
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["datasets"]["synthetic"] = {"kind": "synthetic", **copy.deepcopy(TINY_SYNTHETIC)}
    raw["detector"]["weights"] = "none"
    raw["regions"] |= {"source": "precomp", "precomp_dir": str(precomp)}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    earlier = tmp_path / "data" / "regions"
    earlier.mkdir(parents=True)
    (earlier / "earlier.txt").write_text("the earlier store")
    yield earlier, ["--params", str(params), "--dataset", str(tiny_synthetic), "--detector", str(tmp_path / "none"),
                    "--work", str(tmp_path / "work")]  # fmt: skip


def test_regions_with_an_unwritable_metrics_path_stops_before_replacing_the_store(
    precomputed: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    earlier, argv = precomputed
    metrics = _blocker(tmp_path) / "regions.json"
    with pytest.raises(SystemExit) as stopped:
        run_stage(regions.main, [*argv, "--out", str(earlier), "--metrics", str(metrics)])
    assert stopped.value.code == 2
    assert _one_error_line(capsys).startswith(f"error: {metrics}: cannot be written")
    assert [path.name for path in earlier.iterdir()] == ["earlier.txt"]


def test_a_full_disk_on_the_metrics_puts_the_earlier_store_back(
    precomputed: tuple[Path, list[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The store is written, then the disk fills while the metrics file is: neither output is replaced."""
    earlier, argv = precomputed
    metrics = tmp_path / "metrics" / "regions.json"

    def full_disk(path: Path, text: str) -> None:
        with atomic.staged_file(path):
            raise _disk_full()

    monkeypatch.setattr(atomic, "write_text", full_disk)
    with pytest.raises(SystemExit) as stopped:
        run_stage(regions.main, [*argv, "--out", str(earlier), "--metrics", str(metrics)])
    assert stopped.value.code == 2
    assert _one_error_line(capsys).startswith(f"error: {metrics}: No space left on device")
    assert [path.name for path in earlier.iterdir()] == ["earlier.txt"]
    assert sorted(path.name for path in earlier.parent.iterdir()) == ["regions"]
    assert not metrics.exists()


# --- 10: outputs follow the umask -----------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_the_permissions_the_umask_gives(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        with atomic.staged_dir(tmp_path / "model") as staging:
            save_matcher(staging, {"weight": torch.zeros(2)}, {"name": "tiny"})
        atomic.write_json(tmp_path / "metrics.json", {"rsum": 1.0})
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "model") == 0o777 & ~umask
    for path in (tmp_path / "model" / MODEL_FILE, tmp_path / "model" / CARD_FILE, tmp_path / "metrics.json"):
        assert _mode(path) == 0o666 & ~umask, path


# --- 11: itm search --sheet -----------------------------------------------------------------------------------------


@pytest.fixture
def search_argv(prepared: Path, tiny_synthetic: Path, tmp_path: Path) -> list[str]:  # noqa: F811
    """`itm search` arguments for an untrained VSE++ over the prepared data, before --sheet."""
    data = DataFolders(prepared / "data/regions", prepared / "data/captions")
    vocab = load_vocab(prepared / "data/captions/vocab.json")
    params = TypeAdapter(MatcherParams).validate_python({"kind": "vsepp", "embed_dim": 8, "word_dim": 8})
    torch.manual_seed(0)
    matcher = build_matcher(params, MatcherInputs(data.feature_dim, len(vocab)))
    card = {"name": "vsepp", "kind": "vsepp", "params": params.model_dump(mode="json"), "seed": 0,
            "feature_dim": data.feature_dim, "vocab_size": len(vocab), "vocab_digest": vocab.digest()}  # fmt: skip
    model = seed_path(tmp_path / "models", "vsepp", 0)
    save_matcher(model, matcher.state_dict(), card)
    return ["search", "--model", str(model), "--text", "a red circle", "--regions", str(prepared / "data/regions"),
            "--captions", str(prepared / "data/captions"), "--dataset", str(tiny_synthetic)]  # fmt: skip


def test_search_with_an_unwritable_sheet_stops_before_searching(
    search_argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sheet = _blocker(tmp_path) / "sheet.png"
    with pytest.raises(SystemExit) as stopped:
        commands.main([*search_argv, "--sheet", str(sheet)])
    assert stopped.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().startswith(f"error: {sheet}: cannot be written")


def test_search_with_a_folder_as_sheet_leaves_the_folder_alone(
    search_argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "kept.txt").write_text("mine")
    with pytest.raises(SystemExit) as stopped:
        commands.main([*search_argv, "--sheet", str(folder)])
    assert stopped.value.code == 2
    assert _one_error_line(capsys).startswith(f"error: {folder}: is a folder")
    assert (folder / "kept.txt").read_text() == "mine"
