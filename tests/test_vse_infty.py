"""The `vse_infty` matcher against a transcription of woodfrog/vse_infty (tests/vse_infty_original.py): the GPO,
both encoders (with the same weights, in evaluation and in training), the training-time augmentations on the same
random draws, and the loss with the hardest negative and in its warmup mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from itm.config import VseInftyParams
from itm.data.batches import Regions
from itm.data.loaders import pad_captions
from itm.models import build_matcher
from itm.models.losses import ContrastiveLoss
from itm.models.registry import MatcherInputs
from itm.models.vse_infty import (
    AggregatedRegionEncoder,
    BatchNormRows,
    GeneralizedPooling,
    GpoTextEncoder,
    augment_words,
    drop_regions,
    positional_encoding_1d,
)
from tests import vse_infty_original as original

FEATURE_DIM, EMBED, WORD_DIM = 12, 16, 10
WORDS = ("<pad>", "<start>", "<end>", "<unk>", "a", "man", "in", "hat", "dog", "red", "runs", "two", "on", "grass")
ROWS = len(WORDS) + 1  # VSE∞ appends <mask>
REGION_COUNTS = [5, 1, 7, 3, 7, 2]
CAPTION_LENGTHS = [4, 9, 2, 6, 9, 3, 1]


def _close(actual: Tensor, expected: Tensor, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def _regions(counts: list[int], seed: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, FEATURE_DIM, generator=generator) * 2 for n in counts]


def _batched(images: list[Tensor]) -> Regions:
    """Our batch of per-image regions: zero-padded with a mask (as itm.data.regions.pad_regions)."""
    features, lengths = original.collate_regions(images)
    return Regions(features, torch.arange(features.shape[1])[None] < lengths[:, None])


def _token_ids(lengths: list[int], seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, len(WORDS), (n,), generator=generator).tolist() for n in lengths]


def _image_pair(
    *, batchnorm_rows: BatchNormRows = "padded"
) -> tuple[original.EncoderImageAggr, AggregatedRegionEncoder]:
    torch.manual_seed(0)
    theirs = original.EncoderImageAggr(FEATURE_DIM, EMBED)
    for bn in theirs.mlp.bns:  # non-trivial statistics and affine parameters
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_(std=0.1)
    ours = AggregatedRegionEncoder(
        FEATURE_DIM, EMBED, pe_dim=32, hidden_dim=32, region_drop=0.0, batchnorm_rows=batchnorm_rows
    )
    state = {key.replace("mlp.bns.0.", "mlp.norm."): value for key, value in theirs.state_dict().items()}
    ours.load_state_dict({key: value for key, value in state.items() if not key.startswith("mlp.bns.1.")})
    return theirs, ours


def _text_pair(*, bidirectional: bool = True, word_augment: float = 0.0) -> tuple[original.EncoderText, GpoTextEncoder]:
    torch.manual_seed(1)
    theirs = original.EncoderText(ROWS, EMBED, WORD_DIM, 1, use_bi_gru=True)
    ours = GpoTextEncoder(
        len(WORDS), WORD_DIM, EMBED, bidirectional=bidirectional, pe_dim=32, hidden_dim=32, word_augment=word_augment
    )
    if bidirectional:
        state = {key.replace("rnn.", "gru."): value for key, value in theirs.state_dict().items()}
        ours.load_state_dict(state)
    return theirs, ours


# --- GPO -------------------------------------------------------------------------------------------------------------


def test_position_encodings_equal_vse_inftys() -> None:
    _close(positional_encoding_1d(32, 40), original.positional_encoding_1d(32, 40), atol=0.0)
    with pytest.raises(ValueError, match="even"):
        positional_encoding_1d(7, 3)


@pytest.mark.parametrize("pe_dim, hidden_dim", [(32, 32), (8, 6)])
def test_gpo_equals_vse_inftys(pe_dim: int, hidden_dim: int) -> None:
    torch.manual_seed(2)
    theirs = original.GPO(pe_dim, hidden_dim)
    ours = GeneralizedPooling(pe_dim, hidden_dim)
    ours.load_state_dict(theirs.state_dict())
    lengths = torch.tensor([5, 1, 9, 3, 9, 2])
    features = torch.randn(6, 11, 7) * 3  # two slots beyond the longest, and noise in every padded slot
    expected, expected_weights = theirs(features, lengths)
    pooled, weights = ours(features, lengths)
    _close(pooled, expected)
    _close(weights, expected_weights, atol=1e-7)
    assert weights.shape == (6, 9, 1)
    _close(weights.sum(dim=1).squeeze(-1), torch.ones(6))
    assert (weights[1, 1:] == 0).all() and (weights[5, 2:] == 0).all()  # nothing on padded positions
    # one fragment: its own values; the padding's values are never used
    _close(pooled[1], features[1, 0])
    garbage = features.clone()
    garbage[5, 2:] = 1e3
    _close(ours(garbage, lengths)[0][5], pooled[5])


def test_gpo_weights_sorted_values_per_dimension() -> None:
    """v = Σ_k θ_k · (k-th largest value of each dimension), θ from the lengths alone."""
    torch.manual_seed(3)
    gpo = GeneralizedPooling(32, 32)
    features = torch.randn(2, 4, 5)
    lengths = torch.tensor([4, 3])
    pooled, weights = gpo(features, lengths)
    for row, n in enumerate(lengths.tolist()):
        ranked = features[row, :n].sort(dim=0, descending=True).values  # [n, 5]
        _close(pooled[row], (weights[row, :n] * ranked).sum(dim=0))
    _close(gpo(features[:1].flip(1), lengths[:1])[0], pooled[:1])  # the order of the fragments does not matter


# --- encoders --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
def test_image_encoder_equals_vse_inftys(training: bool) -> None:
    """With the same weights: in evaluation (running statistics) and in training (BatchNorm over every row of the
    padded batch, VSE∞'s code), the pooled vectors and the updated running statistics."""
    theirs, ours = _image_pair()
    theirs.train(training), ours.train(training)
    images = _regions(REGION_COUNTS, seed=4)
    expected = theirs(*original.collate_regions(images))
    encoded = ours(_batched(images))
    _close(encoded.pooled, expected)
    _close(ours.mlp.norm.running_mean, theirs.mlp.bns[0].running_mean, atol=1e-6)
    _close(ours.mlp.norm.running_var, theirs.mlp.bns[0].running_var, atol=1e-6)
    assert encoded.mask.sum(dim=1).tolist() == REGION_COUNTS
    norms = encoded.local.norm(dim=-1)
    _close(norms[encoded.mask], torch.ones(sum(REGION_COUNTS)), atol=1e-5)
    assert (norms[~encoded.mask] == 0).all()


def test_region_drop_equals_vse_inftys_loader() -> None:
    """The same draws drop the same regions as PrecompRegionDataset (kept ones packed at the front, the batch padded
    to its largest kept count as collate_fn pads), and training then gives VSE∞'s vectors."""
    theirs, ours = _image_pair()
    theirs.train(), ours.train()
    counts = [36, 36, 20, 36, 7, 36]
    images = _regions(counts, seed=5)
    draws = torch.rand(len(counts), 36, generator=torch.Generator().manual_seed(6))
    dropped = [original.drop_regions(image.numpy(), draws[i, : len(image)].double().numpy())
               for i, image in enumerate(images)]  # fmt: skip
    assert all(len(d) > 0 for d in dropped) and any(len(d) < len(i) for d, i in zip(dropped, images, strict=True))
    expected = theirs(*original.collate_regions(dropped))
    batch = _batched(images)
    keep = drop_regions(batch.mask, draws, 0.2)
    encoded = ours.encode(batch.features, keep)
    assert encoded.mask.sum(dim=1).tolist() == [len(d) for d in dropped]
    _close(encoded.pooled, expected)


def test_region_drop_keeps_a_region_and_is_off_in_evaluation() -> None:
    batch = _batched(_regions(REGION_COUNTS, seed=7))
    keep = drop_regions(batch.mask, torch.full(batch.mask.shape, 0.1), 0.2)  # every draw below p: all dropped
    assert keep.sum(dim=1).tolist() == [1] * len(REGION_COUNTS)
    assert (keep <= batch.mask).all()
    _, ours = _image_pair()
    ours.region_drop = 0.9
    ours.train()
    torch.manual_seed(8)
    for _ in range(5):
        counts = ours(batch).mask.sum(dim=1)
        assert (counts >= 1).all() and (counts <= torch.tensor(REGION_COUNTS)).all()
    assert ours(batch).mask.sum() < sum(REGION_COUNTS)
    ours.eval()
    with torch.no_grad():
        first, second = ours(batch), ours(batch)
        reference = ours.encode(batch.features, batch.mask)
    assert first.mask.sum(dim=1).tolist() == REGION_COUNTS
    _close(first.pooled, second.pooled, atol=0.0)
    _close(first.pooled, reference.pooled, atol=0.0)


def test_batchnorm_over_real_regions_only() -> None:
    """`batchnorm_rows: regions` takes the training statistics of the real regions alone; evaluation is the same
    in both modes."""
    images = _regions(REGION_COUNTS, seed=9)
    batch = _batched(images)
    _, padded = _image_pair()
    _, regions = _image_pair(batchnorm_rows="regions")
    with torch.no_grad():
        _close(regions.eval()(batch).pooled, padded.eval()(batch).pooled, atol=1e-6)
        before = regions.mlp.norm.running_mean.clone()
        hidden = regions.mlp.layers[0](torch.cat(images))  # [M, hidden] every real region
        regions.train()(batch)
        padded.train()(batch)
    momentum = regions.mlp.norm.momentum
    _close(regions.mlp.norm.running_mean, (1 - momentum) * before + momentum * hidden.mean(dim=0), atol=1e-6)
    assert not torch.allclose(padded.mlp.norm.running_mean, regions.mlp.norm.running_mean, atol=1e-4)


def test_text_encoder_equals_vse_inftys() -> None:
    theirs, ours = _text_pair()
    theirs.eval(), ours.eval()
    token_ids = _token_ids(CAPTION_LENGTHS, seed=10)
    expected = original.encode_sorted(theirs, token_ids)
    encoded = ours(pad_captions(token_ids))
    _close(encoded.pooled, expected)
    assert ours.embed.num_embeddings == ROWS and ours.mask_id == len(WORDS)
    assert encoded.mask.sum(dim=1).tolist() == CAPTION_LENGTHS


def test_unidirectional_text_encoder_pools_the_gru_states() -> None:
    _, ours = _text_pair(bidirectional=False)
    ours.eval()
    token_ids = _token_ids(CAPTION_LENGTHS, seed=11)
    encoded = ours(pad_captions(token_ids))
    for row, ids in enumerate(token_ids):
        states, _ = ours.gru(ours.embed(torch.tensor([ids])))  # [1, n, E]
        pooled, _ = ours.gpool(states, torch.tensor([len(ids)]))
        _close(encoded.pooled[row], original.l2norm(pooled, dim=-1)[0])


def test_word_augmentation_equals_process_caption() -> None:
    """The same draws pick, mask, replace and delete the same tokens as VSE∞'s process_caption(drop=True)."""
    vocab = original.vocabulary(WORDS)
    generator = torch.Generator().manual_seed(12)
    captions = [[WORDS[i] for i in torch.randint(4, len(WORDS), (n,), generator=generator)] for n in
                torch.randint(1, 12, (300,), generator=generator).tolist()]  # fmt: skip
    framed = [original.process_caption(vocab, tokens, drop=False).long().tolist() for tokens in captions]
    batch = pad_captions(framed)
    draws = torch.rand(batch.tokens.shape, generator=generator)
    random_ids = torch.randint(0, ROWS, batch.tokens.shape, generator=generator)
    tokens, lengths = augment_words(batch.tokens, batch.lengths, draws, random_ids, 0.2, mask_id=len(WORDS))
    kinds = {"masked": 0, "replaced": 0, "deleted": 0}
    for row, caption in enumerate(captions):
        n = len(framed[row])
        random = original.Draws(draws[row, :n].tolist(), random_ids[row, :n].tolist())
        expected = original.process_caption(vocab, caption, drop=True, random=random).long().tolist()
        assert tokens[row, : lengths[row]].tolist() == expected, row
        assert (tokens[row, lengths[row] :] == 0).all()
        share = draws[row, :n] / 0.2
        picked = draws[row, :n] < 0.2
        kinds["masked"] += int((picked & (share < 0.5)).sum())
        kinds["replaced"] += int((picked & (share >= 0.5) & (share < 0.6)).sum())
        kinds["deleted"] += int((picked & (share >= 0.6)).sum())
    assert min(kinds.values()) > 5, kinds  # every branch was exercised
    assert vocab.word2idx["<mask>"] == len(WORDS) and len(vocab) == ROWS


def test_word_augmentation_keeps_a_token_and_is_off_in_evaluation() -> None:
    batch = pad_captions(_token_ids(CAPTION_LENGTHS, seed=13))
    deleting = torch.full(batch.tokens.shape, 0.19)  # every token picked, and in the deleted share
    tokens, lengths = augment_words(batch.tokens, batch.lengths, deleting, batch.tokens, 0.2, mask_id=len(WORDS))
    assert lengths.tolist() == [1] * len(CAPTION_LENGTHS)
    _close(tokens[:, 0], batch.tokens[:, 0], atol=0)
    _, ours = _text_pair(word_augment=0.2)
    ours.eval()
    with torch.no_grad():
        plain = ours.encode(batch.tokens, batch.lengths)
        _close(ours(batch).pooled, plain.pooled, atol=0.0)
        ours.train()
        torch.manual_seed(14)
        assert not torch.allclose(ours(batch).pooled, plain.pooled)
        ours.word_augment = 0.0
        _close(ours(batch).pooled, plain.pooled, atol=0.0)


# --- loss and the whole matcher --------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_violation", [True, False])
def test_loss_equals_vse_inftys(max_violation: bool) -> None:
    """The hardest negative, and VSE∞'s warmup (`max_violation_off`: the violations of every negative summed)."""
    generator = torch.Generator().manual_seed(15)
    images = original.l2norm(torch.randn(8, EMBED, generator=generator), dim=-1)
    captions = original.l2norm(torch.randn(8, EMBED, generator=generator) + images, dim=-1)
    theirs = original.ContrastiveLoss(original.options(), margin=0.2, max_violation=True)
    if not max_violation:
        theirs.max_violation_off()
    ours = ContrastiveLoss(0.2, max_violation)(images @ captions.T)
    _close(ours["loss"], theirs(images, captions), atol=1e-5)
    _close(ours["loss"], ours["loss_i2t"] + ours["loss_t2i"], atol=1e-6)


def test_a_training_step_equals_vse_inftys() -> None:
    """The matcher in training mode (augmentations off) gives VSE∞'s loss on the same batch and weights, and
    retrieval is the dot product of the pooled vectors."""
    theirs_image, _ = _image_pair()
    theirs_text, _ = _text_pair()
    params = VseInftyParams(kind="vse_infty", embed_dim=EMBED, word_dim=WORD_DIM, region_drop=0.0, word_augment=0.0)
    matcher = build_matcher(params, MatcherInputs(FEATURE_DIM, len(WORDS)))
    image_state = {f"image_encoder.{key.replace('mlp.bns.0.', 'mlp.norm.')}": value
                   for key, value in theirs_image.state_dict().items() if not key.startswith("mlp.bns.1.")}  # fmt: skip
    text_state = {
        f"text_encoder.{key.replace('rnn.', 'gru.')}": value for key, value in theirs_text.state_dict().items()
    }
    matcher.load_state_dict(image_state | text_state)
    assert isinstance(matcher.loss, ContrastiveLoss)  # the training loop's warmup switches its max_violation
    images = _regions([*REGION_COUNTS, 4], seed=16)
    token_ids = _token_ids(CAPTION_LENGTHS, seed=17)
    theirs_image.train(), theirs_text.train(), matcher.train()
    image_embeddings = theirs_image(*original.collate_regions(images))
    caption_embeddings = original.encode_sorted(theirs_text, token_ids)
    expected = original.ContrastiveLoss(original.options(), margin=0.2, max_violation=True)
    losses = matcher(_batched(images), pad_captions(token_ids))
    _close(losses["loss"], expected(image_embeddings, caption_embeddings), atol=1e-5)

    matcher.eval()
    with torch.no_grad():
        encoded_images, encoded_captions = (
            matcher.encode_image(_batched(images)),
            matcher.encode_text(pad_captions(token_ids)),
        )
        scores = matcher.score(encoded_images, encoded_captions)
    _close(scores, encoded_images.pooled @ encoded_captions.pooled.T, atol=0.0)
    assert scores.shape == (len(images), len(token_ids))


def test_every_parameter_is_vse_inftys() -> None:
    """Our modules hold VSE∞'s tensors (less the BatchNorm its MLP never applies) with their shapes."""
    theirs_image, ours_image = _image_pair()
    theirs_text, ours_text = _text_pair()
    shapes = {key.replace("mlp.bns.0.", "mlp.norm."): tuple(value.shape)
              for key, value in theirs_image.state_dict().items() if not key.startswith("mlp.bns.1.")}  # fmt: skip
    assert {key: tuple(value.shape) for key, value in ours_image.state_dict().items()} == shapes
    text_shapes = {key.replace("rnn.", "gru."): tuple(v.shape) for key, v in theirs_text.state_dict().items()}
    assert {key: tuple(value.shape) for key, value in ours_text.state_dict().items()} == text_shapes
    assert isinstance(ours_image.mlp.norm, nn.BatchNorm1d)  # replaced by a global one under several processes


def test_params_defaults_are_vse_inftys_recipe() -> None:
    params = VseInftyParams(kind="vse_infty")
    assert (params.learning_rate, params.decay_epochs, params.warmup_epochs, params.max_epochs) == (5.0e-4, 15, 1, None)
    assert (params.gpo_pe_dim, params.gpo_hidden_dim, params.region_drop, params.word_augment) == (32, 32, 0.2, 0.2)
    assert (params.margin, params.max_violation, params.bidirectional) == (0.2, True, True)
    with pytest.raises(ValueError, match="multiple of 2"):
        VseInftyParams(kind="vse_infty", gpo_pe_dim=31)
    assert np.isclose(params.region_drop, 0.20)
