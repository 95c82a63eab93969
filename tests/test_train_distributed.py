"""Training in two processes (DDP over gloo) against one process with the same global batch, and the batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from itm.config import MatcherParams, TrainParams, load_params
from itm.data.batches import Captions, Regions
from itm.data.concepts import Concepts
from itm.data.loaders import pad_captions
from itm.distributed import Context
from itm.models import Matcher, MatcherInputs, build_matcher
from itm.tracking import NullTracker
from itm.train.batch_norm import with_global_batch_norm
from itm.train.batches import GlobalBatchSampler
from itm.train.loop import fit
from tests.processes import run_processes

pytestmark = pytest.mark.slow  # several processes

FEATURE_DIM, VOCAB, N_CONCEPTS, REGIONS = 12, 30, 6, 5
N_PAIRS, GLOBAL_BATCH = 26, 8  # three global batches of 8 (two pairs left over, dropped)
SETTINGS = TrainParams(max_epochs=1, batch_size=GLOBAL_BATCH, learning_rate=1.0e-2, precision="fp32")
MATCHERS = ["vsepp", "scan_t2i_avg", "scan_i2t_lse", "uarda", "cvse", "mh_cvse", "mvam"]


class _RandomPairs(Dataset):
    """Region features and captions of 3..9 words (so the processes' batches pad to different lengths)."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(3)
        self.features = torch.randn(N_PAIRS, REGIONS, FEATURE_DIM, generator=generator)
        lengths = torch.randint(3, 10, (N_PAIRS,), generator=generator).tolist()
        self.tokens = [torch.randint(1, VOCAB, (n,), generator=generator).tolist() for n in lengths]
        self.concepts = [torch.randperm(N_CONCEPTS, generator=generator)[:2].tolist() for _ in lengths]

    def __len__(self) -> int:
        return N_PAIRS

    def __getitem__(self, index: int) -> tuple[torch.Tensor, list[int], list[int]]:
        return self.features[index], self.tokens[index], self.concepts[index]


def _collate(items: list) -> tuple[Regions, Captions]:
    features = torch.stack([item[0] for item in items])
    regions = Regions(features, torch.ones(features.shape[:2], dtype=torch.bool))
    return regions, pad_captions([item[1] for item in items], [item[2] for item in items], N_CONCEPTS)


def _params(name: str) -> MatcherParams:
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml").matchers[name]
    small = {"embed_dim": 16, "word_dim": 8}
    if params.kind in ("cvse", "mh_cvse"):
        small |= {"dropout": 0.0, "concept_input_dim": 8}  # dropout masks differ between processes
    if params.kind == "uarda":
        small |= {"threshold_min_samples": 10}  # so that the threshold moves within the epoch
    if params.kind == "mvam":
        small |= {"views": 4}
    return params.model_copy(update=small)


def _matcher(name: str) -> Matcher:
    cooccurrence = np.full((N_CONCEPTS, N_CONCEPTS), 3) + 7 * np.eye(N_CONCEPTS, dtype=np.int64)
    concepts = Concepts(tuple(f"c{i}" for i in range(N_CONCEPTS)), tuple(np.diag(cooccurrence)), cooccurrence, 40)
    torch.manual_seed(0)
    return build_matcher(_params(name), MatcherInputs(FEATURE_DIM, VOCAB, concepts))


def _train_one_epoch(context: Context, name: str, work: Path) -> dict[str, torch.Tensor]:
    """One epoch of `fit`: the epoch's mean loss, and the trained matcher's scores of a fixed batch."""
    matcher = _matcher(name)
    dataset = _RandomPairs()

    def batches(epoch: int) -> DataLoader:
        lengths = [len(tokens) for tokens in dataset.tokens]
        sampler = GlobalBatchSampler(lengths, GLOBAL_BATCH, seed=epoch, rank=context.rank,
                                     world_size=context.world_size)  # fmt: skip
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=_collate)

    tracker = NullTracker()
    fit(matcher, batches, lambda _: {"rsum": 0.0}, SETTINGS, work_dir=work / str(context.rank), fingerprint="r",
        tracker=tracker, device=torch.device("cpu"), label=name, context=context)  # fmt: skip
    regions, captions = _collate([dataset[i] for i in range(N_PAIRS)])
    with torch.no_grad():
        scores = matcher.eval().score(matcher.encode_image(regions), matcher.encode_text(captions))
    return {"loss": torch.tensor(tracker.metrics[0][0]["train/loss"]), "scores": scores}


def _first_step(context: Context, names: list[str]) -> dict[str, tuple[dict[str, float], dict[str, torch.Tensor]]]:
    """Per matcher: the loss terms of the first global batch, and this process's gradients (before averaging)."""
    dataset = _RandomPairs()
    sampler = GlobalBatchSampler([len(t) for t in dataset.tokens], GLOBAL_BATCH, seed=0, rank=context.rank,
                                 world_size=context.world_size)  # fmt: skip
    regions, captions = _collate([dataset[i] for i in next(iter(sampler))])
    out = {}
    for name in names:
        matcher = with_global_batch_norm(_matcher(name).train(), context)
        losses = matcher(regions, captions, context)
        losses["loss"].backward()
        grads = {key: p.grad.clone() for key, p in matcher.named_parameters() if p.grad is not None}
        out[name] = ({key: float(value.detach()) for key, value in losses.items()}, grads)
    return out


def test_the_gradients_of_two_processes_average_to_one_process_s() -> None:
    """Every matcher: the loss of the global batch is the same in both processes and one process, and DDP's average
    of the two processes' gradients is one process's gradient on the whole batch (up to rounding: gradients that are
    zero in exact arithmetic, like those of a bias before a BatchNorm, come out at 1e-5 of the largest)."""
    single = _first_step(Context(), MATCHERS)
    ranks = run_processes(_first_step, MATCHERS)
    for name in MATCHERS:
        losses, grads = single[name]
        for rank in ranks:
            assert rank[name][0] == pytest.approx(losses, rel=1e-5), name
        scale = max(float(g.abs().max()) for g in grads.values())
        assert grads.keys() == ranks[0][name][1].keys() == ranks[1][name][1].keys(), name
        for key, expected in grads.items():
            averaged = (ranks[0][name][1][key] + ranks[1][name][1][key]) / 2
            torch.testing.assert_close(averaged, expected, rtol=1e-4, atol=1e-4 * scale, msg=f"{name}: {key}")


# The trained matchers are compared by what they compute, not weight by weight: some parameters have a gradient that
# is zero up to rounding (a bias before a BatchNorm or inside a softmax's logits), and Adam turns that rounding noise
# into full-size steps that change nothing downstream. CVSE and MH-CVSE are left out: their BatchNorm's running mean
# follows such a bias into evaluation (the gradient test above covers them).
@pytest.mark.parametrize("name", ["vsepp", "scan_t2i_avg", "uarda", "mvam"])
def test_an_epoch_in_two_processes_matches_one_process_with_the_same_global_batch(name: str, tmp_path: Path) -> None:
    single = _train_one_epoch(Context(), name, tmp_path / "single")
    for rank in run_processes(_train_one_epoch, name, tmp_path / "ddp"):
        torch.testing.assert_close(rank["loss"], single["loss"], rtol=1e-4, atol=0, msg=name)
        torch.testing.assert_close(rank["scores"], single["scores"], rtol=0, atol=1e-4, msg=name)


def test_the_processes_shares_make_up_the_single_process_batches() -> None:
    lengths = list(np.random.default_rng(0).integers(3, 20, size=50))
    for bucket in (0, 3):
        single = list(GlobalBatchSampler(lengths, 8, seed=5, bucket_batches=bucket))
        shares = [list(GlobalBatchSampler(lengths, 8, seed=5, rank=r, world_size=2, bucket_batches=bucket))
                  for r in range(2)]  # fmt: skip
        assert len(single) == 6 and all(len(batch) == 8 for batch in single)  # 50 // 8; the partial one dropped
        assert [a + b for a, b in zip(*shares, strict=True)] == single
        assert len({i for batch in single for i in batch}) == 48  # nothing repeated


def test_length_buckets_hold_similar_lengths() -> None:
    lengths = list(np.random.default_rng(1).integers(3, 40, size=400))
    spread = {}
    for bucket in (0, 10):
        batches = list(GlobalBatchSampler(lengths, 16, seed=2, bucket_batches=bucket))
        spread[bucket] = np.mean([np.ptp([lengths[i] for i in batch]) for batch in batches])
    assert spread[10] < spread[0] / 3
