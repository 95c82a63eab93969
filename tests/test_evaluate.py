"""Evaluation: recall metrics against SCAN's loops, dataset protocols, chunked scoring, encoding and ensembles."""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from itm.data.batches import Captions, Regions
from itm.data.regions import ImageRegions, RegionStore, write_store
from itm.device import autocast, running_precision
from itm.errors import UserError
from itm.evaluate.ensemble import average_scores, evaluate_ensemble
from itm.evaluate.headline import KS, headline
from itm.evaluate.metrics import RSUM_KS, naive_recall_metrics, recall_metrics
from itm.evaluate.protocols import evaluate_protocols, protocols_for
from itm.evaluate.score_file import SplitScores
from itm.evaluate.scoring import (
    Scored,
    TimedEncoded,
    encode_captions,
    encode_images,
    retrieval_timing,
    score_matrix,
)
from itm.evaluate.statistics import INTERVAL_KEYS, Bootstrap, ci_keys
from itm.models.base import Encoded, Matcher
from itm.seeds import seed_path
from tests.conftest import REPO

CPU = torch.device("cpu")


def _assert_close(actual: Tensor, expected: Tensor) -> None:
    """Like torch.testing.assert_close, without its seconds-long import of torch.distributed."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-6), (actual - expected).abs().max()


# --- metrics ---------------------------------------------------------------------------------------------------


def _assert_same(fast: dict[str, float], naive: dict[str, float]) -> None:
    assert fast.keys() == naive.keys()
    for key in fast:
        assert fast[key] == pytest.approx(naive[key], abs=1e-9), key


def test_metrics_match_scan_loops_with_five_captions_per_image() -> None:
    generator = torch.Generator().manual_seed(0)
    n_img = 40
    caption_image = torch.arange(n_img).repeat_interleave(5)  # SCAN layout: captions 5i..5i+4 belong to image i
    # A signal on the ground-truth pairs so the ranks spread over 0..n rather than all being large.
    scores = torch.randn(n_img, 5 * n_img, generator=generator)
    scores[caption_image, torch.arange(5 * n_img)] += 1.5
    fast = recall_metrics(scores, caption_image)
    _assert_same(fast, naive_recall_metrics(scores, caption_image))
    assert set(fast) == {
        *(f"{side}_{name}" for side in ("i2t", "t2i") for name in ("r1", "r5", "r10", "medr", "meanr")),
        "rsum",
    }
    assert 0 < fast["i2t_r1"] < 100 and 0 < fast["t2i_r1"] < 100


def test_metrics_match_scan_loops_with_uneven_shuffled_captions() -> None:
    generator = torch.Generator().manual_seed(1)
    n_img = 31
    counts = torch.randint(1, 8, (n_img,), generator=generator)
    caption_image = torch.arange(n_img).repeat_interleave(counts)
    caption_image = caption_image[torch.randperm(len(caption_image), generator=generator)]  # not consecutive
    scores = torch.randn(n_img, len(caption_image), generator=generator)
    scores[caption_image, torch.arange(len(caption_image))] += 1.0
    ks = (1, 2, 3, 5, 10, 20)
    _assert_same(recall_metrics(scores, caption_image, ks=ks), naive_recall_metrics(scores, caption_image, ks=ks))


def test_metrics_of_a_hand_made_case() -> None:
    # 3 images, 2 captions each (captions 2i, 2i+1 describe image i).
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.5, 0.2, 0.3, 0.0],  # image 0: its caption 0 is the best of the row -> rank 0
            [0.8, 0.7, 0.1, 0.6, 0.2, 0.3],  # image 1: best own caption 3 (0.6) below 0.8, 0.7 -> rank 2
            [0.4, 0.3, 0.2, 0.1, 0.0, 0.35],  # image 2: best own caption 5 (0.35) below 0.4 -> rank 1
        ]
    )
    caption_image = torch.tensor([0, 0, 1, 1, 2, 2])
    # t2i rank of each caption (column) among the 3 images: 0.9 top -> 0; 0.1 below 0.7, 0.3 -> 2; 0.1 below 0.5,
    # 0.2 -> 2; 0.6 top -> 0; 0.0 below 0.3, 0.2 -> 2; 0.35 top -> 0.
    figures = recall_metrics(scores, caption_image)
    assert figures["i2t_r1"] == pytest.approx(100 / 3)  # ranks 0, 2, 1
    assert figures["i2t_r5"] == figures["i2t_r10"] == 100.0
    assert figures["i2t_medr"] == 2.0  # floor(median(0, 2, 1)) + 1
    assert figures["i2t_meanr"] == pytest.approx(2.0)
    assert figures["t2i_r1"] == pytest.approx(50.0)  # ranks 0, 2, 2, 0, 2, 0
    assert figures["t2i_medr"] == 2.0  # floor(median = 1.0) + 1
    assert figures["t2i_meanr"] == pytest.approx(2.0)
    assert figures["rsum"] == pytest.approx(100 / 3 + 200 + 50 + 200)
    _assert_same(figures, naive_recall_metrics(scores, caption_image))


def test_median_rank_of_an_even_count_follows_numpy() -> None:
    # One caption per image; t2i ranks 0, 0, 3, 3: numpy's median 1.5 gives medr 2 (torch's lower median would give 1).
    columns = [[4.0, 3.0, 2.0, 1.0], [3.0, 4.0, 2.0, 1.0], [4.0, 3.0, 1.0, 2.0], [4.0, 3.0, 2.0, 1.0]]
    scores = torch.tensor(columns).T  # [4 images, 4 captions]
    figures = recall_metrics(scores, torch.arange(4))
    assert figures["t2i_medr"] == 2.0
    assert figures["t2i_meanr"] == 2.5
    _assert_same(figures, naive_recall_metrics(scores, torch.arange(4)))


def test_ties_count_against_the_ground_truth() -> None:
    caption_image = torch.tensor([0, 1, 2])
    constant = torch.zeros(3, 3)  # a collapsed matcher: every pair equal
    figures = recall_metrics(constant, caption_image)
    assert figures["i2t_r1"] == figures["t2i_r1"] == 0.0
    assert figures["i2t_meanr"] == figures["t2i_meanr"] == 3.0  # rank 2 (0-based) for every query
    _assert_same(figures, naive_recall_metrics(constant, caption_image))

    # One tie in row 0 / column 0 only: image 0's own caption ties with caption 1.
    scores = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.9, 0.0], [0.5, 0.0, 0.9]])
    figures = recall_metrics(scores, caption_image)
    assert figures["i2t_r1"] == pytest.approx(200 / 3)  # image 0 ranked 1 (tie lost), images 1, 2 at 0
    assert figures["t2i_r1"] == pytest.approx(200 / 3)  # caption 0 ties with image 2 and loses
    _assert_same(figures, naive_recall_metrics(scores, caption_image))


def test_ties_among_an_images_own_captions_do_not_count() -> None:
    scores = torch.tensor([[0.7, 0.7, 0.1], [0.2, 0.2, 0.9]])  # image 0's two captions tie with each other
    figures = recall_metrics(scores, torch.tensor([0, 0, 1]))
    assert figures["i2t_r1"] == 100.0


def test_metrics_refuse_nan_and_captionless_images() -> None:
    scores = torch.zeros(2, 2)
    scores[0, 1] = torch.nan
    with pytest.raises(ValueError, match="NaN"):
        recall_metrics(scores, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="at least one caption"):
        recall_metrics(torch.zeros(3, 2), torch.tensor([0, 1]))


# --- protocols -------------------------------------------------------------------------------------------------


def _gallery(n_img: int, per_image: int, seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    caption_image = torch.arange(n_img).repeat_interleave(per_image)
    scores = torch.randn(n_img, len(caption_image), generator=generator)
    scores[caption_image, torch.arange(len(caption_image))] += 2.0
    return scores, caption_image


def test_single_gallery_protocol_for_flickr_and_synthetic() -> None:
    scores, caption_image = _gallery(20, 5, seed=2)
    for kind in ("flickr30k", "synthetic"):
        (protocol,) = protocols_for(kind, 20)
        assert protocol.name == "test" and len(protocol.folds) == 1
        figures = evaluate_protocols(scores, caption_image, [protocol])
        expected = recall_metrics(scores, caption_image)
        assert figures == {f"test/{key}": value for key, value in expected.items()}


def test_coco_five_folds_of_a_thousand_images_and_the_5k_gallery() -> None:
    per_image = 2  # SCAN has 5; fewer keeps the 5,000-image matrices small enough for a fast test
    scores, caption_image = _gallery(5000, per_image, seed=3)
    five_fold, whole = protocols_for("coco", 5000)
    assert (five_fold.name, whole.name) == ("test_5fold1k", "test_5k")
    assert [fold.images.tolist() for fold in five_fold.folds] == [
        list(range(f * 1000, (f + 1) * 1000)) for f in range(5)
    ]

    figures = evaluate_protocols(scores, caption_image, [five_fold, whole])
    per_fold = []
    for f in range(5):  # SCAN evalrank(fold5=True): images f*1000..(f+1)*1000 and their captions
        block = scores[f * 1000 : (f + 1) * 1000, f * 1000 * per_image : (f + 1) * 1000 * per_image]
        per_fold.append(recall_metrics(block, torch.arange(1000).repeat_interleave(per_image)))
    for key in per_fold[0]:  # every figure, rsum included, is the mean over the folds
        assert figures[f"test_5fold1k/{key}"] == pytest.approx(np.mean([fold[key] for fold in per_fold]))
    whole_figures = recall_metrics(scores, caption_image)
    assert all(figures[f"test_5k/{key}"] == value for key, value in whole_figures.items())
    assert figures["test_5k/rsum"] < figures["test_5fold1k/rsum"]  # a 5x larger gallery is harder
    assert all(set(key) <= set("abcdefghijklmnopqrstuvwxyz0123456789_/") for key in figures)

    # A fold's captions are those of its images wherever they sit in the split, not a range of columns.
    permutation = torch.randperm(len(caption_image), generator=torch.Generator().manual_seed(5))
    shuffled = evaluate_protocols(scores[:, permutation], caption_image[permutation], [five_fold, whole])
    assert shuffled.keys() == figures.keys()
    assert all(shuffled[key] == pytest.approx(figures[key]) for key in figures)


def test_the_1000_image_coco_test_is_not_1k() -> None:
    with pytest.raises(UserError, match="1000 images"):
        protocols_for("coco", 1000)
    with pytest.raises(UserError, match="4999 images"):
        protocols_for("coco", 4999)
    with pytest.raises(UserError, match="'imagenet'"):
        protocols_for("imagenet", 1000)


# --- scoring ---------------------------------------------------------------------------------------------------


class _MeanRegions(nn.Module):
    """Linear region embedding, masked mean as the pooled vector."""

    def __init__(self, feature_dim: int, size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(feature_dim, size)

    def forward(self, regions: Regions) -> Encoded:
        local = self.linear(regions.features.float())  # [B, R, E]
        weights = regions.mask.float()[..., None]  # [B, R, 1]
        pooled = (local * weights).sum(1) / weights.sum(1)  # [B, E]
        return Encoded(local, regions.mask, pooled, {"n_regions": regions.mask.sum(1)})


class _MeanWords(nn.Module):
    def __init__(self, vocab_size: int, size: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, size)

    def forward(self, captions: Captions) -> Encoded:
        local = self.embedding(captions.tokens)  # [B, L, E]
        weights = captions.mask.float()[..., None]
        return Encoded(local, captions.mask, (local * weights).sum(1) / weights.sum(1))


class _Cosine(nn.Module):
    def forward(self, images: Encoded, captions: Encoded) -> Tensor:
        assert images.pooled is not None and captions.pooled is not None
        return nn.functional.normalize(images.pooled, dim=-1) @ nn.functional.normalize(captions.pooled, dim=-1).T


def _matcher(feature_dim: int = 6, vocab_size: int = 30, size: int = 8) -> Matcher:
    torch.manual_seed(0)
    return Matcher(_MeanRegions(feature_dim, size), _MeanWords(vocab_size, size), _Cosine(), nn.Identity())


def _store(folder: Path, counts: list[int], feature_dim: int = 6) -> RegionStore:
    rng = np.random.default_rng(0)
    images = [
        ImageRegions(
            image_id=100 + index,
            width=64,
            height=48,
            features=rng.standard_normal((n, feature_dim)).astype(np.float16),
            boxes=np.full((n, 4), np.nan, dtype=np.float32),
            object_ids=np.full(n, -1, dtype=np.int16),
            object_confidence=np.full(n, np.nan, dtype=np.float32),
            attribute_ids=np.full(n, -1, dtype=np.int16),
            attribute_confidence=np.full(n, np.nan, dtype=np.float32),
        )
        for index, n in enumerate(counts)
    ]
    write_store(folder, images, [], feature_dim, {"source": "test"})
    return RegionStore(folder)


def test_encode_images_pads_and_masks_variable_region_counts(tmp_path: Path) -> None:
    counts = [3, 7, 2, 5, 4]
    store = _store(tmp_path / "regions", counts)
    matcher = _matcher()
    matcher.train()
    image_ids = [104, 100, 101, 103, 102]  # not store order
    encoded = encode_images(matcher, store, image_ids, batch_size=2, device=CPU)
    assert matcher.training  # the caller's mode comes back
    assert isinstance(encoded, TimedEncoded) and encoded.seconds > 0
    assert encoded.local.shape == (5, 7, 8) and encoded.mask.shape == (5, 7)
    assert encoded.mask.sum(1).tolist() == [counts[i - 100] for i in image_ids]
    assert encoded.extras["n_regions"].tolist() == [counts[i - 100] for i in image_ids]
    assert not encoded.local.requires_grad
    for row, image_id in enumerate(image_ids):
        n = counts[image_id - 100]
        alone = matcher.encode_image(
            Regions(torch.from_numpy(np.array(store.features_of(image_id)))[None], torch.ones(1, n, dtype=torch.bool))
        )
        _assert_close(encoded.local[row, :n], alone.local[0].detach())
        _assert_close(encoded.pooled[row], alone.pooled[0].detach())
        assert not encoded.mask[row, n:].any()


def test_encode_captions_returns_input_order(tmp_path: Path) -> None:
    token_ids = [[1, 5, 2], [1, 7, 8, 9, 10, 2], [1, 2], [1, 3, 4, 2], [1, 11, 12, 13, 2]]
    matcher = _matcher()
    encoded = encode_captions(matcher, token_ids, batch_size=2, device=CPU)
    assert encoded.local.shape == (5, 6, 8)
    assert encoded.mask.sum(1).tolist() == [len(ids) for ids in token_ids]
    for row, ids in enumerate(token_ids):
        alone = matcher.encode_text(Captions(torch.tensor([ids]), torch.tensor([len(ids)])))
        _assert_close(encoded.local[row, : len(ids)], alone.local[0].detach())
        _assert_close(encoded.pooled[row], alone.pooled[0].detach())
        assert not encoded.mask[row, len(ids) :].any()


def test_chunked_scoring_equals_one_block(tmp_path: Path) -> None:
    store = _store(tmp_path / "regions", [3, 7, 2, 5, 4, 6, 1])
    generator = torch.Generator().manual_seed(6)
    token_ids = [
        [1, *torch.randint(3, 30, (int(n),), generator=generator).tolist(), 2]
        for n in torch.randint(1, 9, (17,), generator=generator)
    ]
    matcher = _matcher()
    images = encode_images(matcher, store, store.image_ids, batch_size=3, device=CPU)
    captions = encode_captions(matcher, token_ids, batch_size=4, device=CPU)
    whole = score_matrix(matcher, images, captions, image_chunk=100, caption_chunk=100, device=CPU, precision="fp16")
    chunked = score_matrix(matcher, images, captions, image_chunk=2, caption_chunk=5, device=CPU, precision="fp16")
    assert whole.matrix.shape == (7, 17) and whole.matrix.dtype == torch.float32
    _assert_close(chunked.matrix, whole.matrix)
    _assert_close(whole.matrix, matcher.score(images, captions))
    assert chunked.encode_seconds == pytest.approx(images.seconds + captions.seconds)

    timing = retrieval_timing(chunked, len(token_ids))
    assert timing["seconds_per_query"] == pytest.approx(chunked.score_seconds / 17)
    assert timing.keys() == {"seconds_per_query", "score_seconds", "encode_seconds"}
    plain = score_matrix(
        matcher, images.slice(0, 7), captions, image_chunk=3, caption_chunk=3, device=CPU, precision="fp32"
    )
    assert plain.encode_seconds is None and "encode_seconds" not in retrieval_timing(plain)


def test_score_matrix_runs_in_eval_mode() -> None:
    seen: list[bool] = []

    class Spy(_Cosine):
        def forward(self, images: Encoded, captions: Encoded) -> Tensor:
            seen.append(self.training or torch.is_grad_enabled())
            return super().forward(images, captions)

    matcher = Matcher(_MeanRegions(6, 8), _MeanWords(30, 8), Spy(), nn.Identity())
    images = Encoded(torch.randn(4, 3, 8), torch.ones(4, 3, dtype=torch.bool), torch.randn(4, 8))
    captions = Encoded(torch.randn(6, 2, 8), torch.ones(6, 2, dtype=torch.bool), torch.randn(6, 8))
    scored = score_matrix(matcher, images, captions, image_chunk=3, caption_chunk=4, device=CPU, precision="fp32")
    assert isinstance(scored, Scored) and seen == [False] * 4 and matcher.training


def test_matchers_autocast_only_on_cuda() -> None:
    cuda = torch.device("cuda")
    for precision in ("bf16", "fp16", "fp32"):
        assert running_precision(precision, CPU) == "fp32"  # the CPU trains and scores in fp32
        assert running_precision(precision, cuda) == precision
    assert isinstance(autocast("fp32", cuda), contextlib.nullcontext)
    assert isinstance(autocast("fp32", CPU), contextlib.nullcontext)
    assert autocast("bf16", CPU).fast_dtype == torch.bfloat16  # asked for explicitly (region extraction, benchmarks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available": the object is made all the same
        assert autocast("bf16", cuda).fast_dtype == torch.bfloat16
        assert autocast("fp16", cuda).fast_dtype == torch.float16
    images = Encoded(torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool), torch.randn(2, 8))
    with pytest.raises(ValueError, match="precision must be one of bf16, fp16, fp32, got 'amp'"):
        score_matrix(_matcher(), images, images, image_chunk=2, caption_chunk=2, device=CPU, precision="amp")


# --- ensemble --------------------------------------------------------------------------------------------------


def test_ensemble_averages_similarity_matrices() -> None:
    first, second, third = torch.randn(4, 20), torch.randn(4, 20), torch.randn(4, 20)
    _assert_close(average_scores([first, second]), (first + second) / 2)
    _assert_close(average_scores([first, second, third]), (first + second + third) / 3)
    _assert_close(average_scores([first.double()]), first)
    with pytest.raises(ValueError, match=r"shape \(4, 19\), expected \(4, 20\)"):
        average_scores([first, second[:, :19]])
    with pytest.raises(ValueError, match="at least one"):
        average_scores([])


def _saved_gallery(path: Path, seed: int, signal: float) -> SplitScores:
    scores, caption_image = _gallery(40, 5, seed=seed)
    scores[caption_image, torch.arange(len(caption_image))] += signal - 2.0  # _gallery adds 2.0
    test = SplitScores(scores, np.arange(40), np.arange(200), caption_image)
    test.save(path)
    return test


def test_ensemble_metrics_carry_an_interval_beside_every_recall_and_rsum(tmp_path: Path) -> None:
    members = [_saved_gallery(tmp_path / f"{name}.npz", seed, 0.5) for name, seed in (("a", 7), ("b", 8))]
    figures = evaluate_ensemble([tmp_path / "a.npz", tmp_path / "b.npz"], "synthetic", Bootstrap(resamples=300))
    recall_keys = [f"{side}_{name}" for side in ("i2t", "t2i") for name in ("r1", "r5", "r10", "medr", "meanr")]
    bounds = {f"test/{key}{bound}" for key in INTERVAL_KEYS for bound in ("_ci_low", "_ci_high")}
    assert set(figures) == {f"test/{key}" for key in (*recall_keys, "rsum", "images", "captions")} | bounds
    keys = list(figures)
    assert keys[keys.index("test/rsum") : keys.index("test/rsum") + 3] == ["test/rsum", *ci_keys("test/rsum")]
    expected = recall_metrics((members[0].scores + members[1].scores) / 2, members[0].caption_image)
    for key in INTERVAL_KEYS:
        assert (
            figures[f"test/{key}_ci_low"] <= expected[key] == figures[f"test/{key}"] <= figures[f"test/{key}_ci_high"]
        )
    assert figures["test/rsum_ci_low"] < figures["test/rsum_ci_high"]
    again = evaluate_ensemble([tmp_path / "a.npz", tmp_path / "b.npz"], "synthetic", Bootstrap(resamples=300))
    assert again == figures  # seeded


@pytest.mark.slow
def test_the_intervals_reach_mlflow_with_the_other_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from itm.config import load_params
    from stages import ensemble

    params = load_params(REPO / "params.yaml")
    name, members = next(iter(params.evaluate.ensembles.items()))
    first = params.train.seeds[0]  # the default --seed
    for seed, member in enumerate(members, start=9):
        _saved_gallery(seed_path(tmp_path / "scores", member, first, ".npz"), seed, 1.0)
    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ITM_TRACKING", "on")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "itm-intervals-test")
    metrics = seed_path(tmp_path / "metrics", name, first, ".json")
    arguments = ["--params", str(REPO / "params.yaml"), "--name", name, "--scores", str(tmp_path / "scores"),
                 "--metrics", str(metrics)]  # fmt: skip
    unknown = max(params.train.seeds) + 1
    with pytest.raises(UserError, match=rf"--seed {unknown} is not one of train.seeds"):
        ensemble.main([*arguments, "--seed", str(unknown)])
    ensemble.main(arguments)
    written = json.loads(metrics.read_text())
    assert written["test/rsum_ci_low"] < written["test/rsum"] < written["test/rsum_ci_high"]

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = mlflow.search_runs(experiment_names=["itm-intervals-test"], output_format="list")
    logged = run.data.metrics
    assert {key: logged[key] for key in written} == pytest.approx(written)  # every bound, beside its figure
    assert run.data.params["bootstrap.resamples"] == str(params.evaluate.bootstrap.resamples)
    assert run.info.run_name == f"ensemble@{name}-{first}" and run.data.tags["itm.seed"] == str(first)


def test_the_headline_is_one_line_per_protocol_with_the_rsum_interval() -> None:
    metrics = {f"{p}/{side}_r{k}": 10.0 * k + (p == "test_5k") for p in ("test_5fold1k", "test_5k")
               for side in ("i2t", "t2i") for k in (1, 5, 10)}  # fmt: skip
    metrics |= {"test_5fold1k/rsum": 320.0, "test_5k/rsum": 326.0, "test_5k/rsum_ci_low": 320.04}
    metrics |= {"test_5k/rsum_ci_high": 331.96, "test_5k/images": 5000}
    assert headline("evaluate@vsepp-0", metrics) == [
        "evaluate@vsepp-0 test_5fold1k: i2t R@1/5/10 10.0/50.0/100.0, t2i R@1/5/10 10.0/50.0/100.0, rSum 320.0",
        "evaluate@vsepp-0 test_5k: i2t R@1/5/10 11.0/51.0/101.0, t2i R@1/5/10 11.0/51.0/101.0, rSum 326.0 "
        "[320.0, 332.0]",
    ]


def test_the_headline_keys_are_those_of_rsum() -> None:
    assert KS == RSUM_KS
