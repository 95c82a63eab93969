"""CVSE and MH-CVSE parts: the concept graph on a hand-worked example, the concept predictor, every fusion mode, the
KL term, Dynamic Weight Average and GloVe inputs (the transductive completion of test labels: test_completion.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import TypeAdapter
from torch import Tensor

from itm.config import MatcherParams
from itm.data.concepts import Concepts
from itm.data.glove import read_word_vectors
from itm.data.loaders import CaptionTable, PairCollator, image_concepts
from itm.data.regions import pad_regions
from itm.errors import UserError
from itm.models import MatcherInputs, build_matcher, inputs_for_training
from itm.models.base import Encoded
from itm.models.consensus import (
    ConceptPredictor,
    Fusion,
    concept_adjacency,
    concept_kl,
    consensus_embedding,
    label_distribution,
)
from itm.models.cvse import ConsensusLoss, MemoryAttention, MultiHeadMemoryAttention, dwa_factors
from itm.models.encoders import l2norm


def _close(actual: Tensor, expected: Tensor, atol: float = 1e-6) -> None:
    assert actual.shape == expected.shape
    assert torch.allclose(actual.float(), expected.float(), rtol=0, atol=atol), (actual - expected).abs().max()


# --- the concept graph ---------------------------------------------------------------------------------------------


def test_concept_graph_by_hand() -> None:
    """Three concepts seen in 10, 5 and 4 captions; pairs (0, 1) in 5, (0, 2) in 1, (1, 2) in 2.

    P(j|i) without the diagonal: row 0 [0, .5, .1], row 1 [1, 0, .4], row 2 [.25, .5, 0]. Rescaled by
    f(x) = 5^(x - .02) - 5^-.02, an entry passes tau = .3 from x >= .1677: .25 passes (its raw value would not),
    .1 does not. Edges: row 0 [0 1 0], row 1 [1 0 1], row 2 [1 1 0]; column sums 2, 2, 1; re-weighted by .25 and
    plus I: A = [[1, .125, 0], [.125, 1, .25], [.125, .125, 1]], row sums d = 1.125, 1.375, 1.25;
    the graph is A^T[i, j] / sqrt(d_i d_j).
    """
    cooccurrence = np.array([[10, 5, 1], [5, 5, 2], [1, 2, 4]])
    a = np.array([[1, 0.125, 0], [0.125, 1, 0.25], [0.125, 0.125, 1]])
    d = np.array([1.125, 1.375, 1.25])
    expected = torch.tensor(a.T / np.sqrt(d[:, None] * d[None, :]), dtype=torch.float32)
    _close(concept_adjacency(cooccurrence), expected, atol=1e-6)
    assert expected[0, 1] == pytest.approx(0.125 / math.sqrt(1.125 * 1.375))
    assert expected[2, 0] == 0  # no edge 0 -> 2: P(2|0) = .1 stays under tau after rescaling


def test_concept_graph_parameters_move_the_cut() -> None:
    cooccurrence = np.array([[10, 5, 1], [5, 5, 2], [1, 2, 4]])
    everything = concept_adjacency(cooccurrence, threshold=0.0)  # every pair with P >= 0 is an edge
    assert (everything > 0).all()
    nothing = concept_adjacency(cooccurrence, threshold=100.0)  # only the self-loops remain: the identity
    _close(nothing, torch.eye(3))


# --- concept scores, consensus and fusion -----------------------------------------------------------------------


def test_concept_predictor_equals_the_direct_formula() -> None:
    torch.manual_seed(0)
    predictor = ConceptPredictor(8, smoothing=10.0).eval()
    instance, concepts = torch.randn(4, 8), l2norm(torch.randn(5, 8))
    with torch.no_grad():
        hidden = predictor.instance_branch(instance)[:, None, :] * predictor.concept_branch(concepts)[None]  # [4,5,8]
        logits = predictor.score(hidden).squeeze(-1)
        _close(predictor(instance, concepts), F.log_softmax(10.0 * logits, dim=1), atol=1e-5)


def test_label_distribution_and_consensus_embedding() -> None:
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    distribution = label_distribution(labels, smoothing=10.0)
    high, low = math.exp(10) / (2 * math.exp(10) + 1), 1 / (2 * math.exp(10) + 1)
    _close(distribution, torch.tensor([[high, low, high], [1 / 3, 1 / 3, 1 / 3]]))  # no labels: uniform (CVSE)
    concepts = torch.eye(3)
    _close(consensus_embedding(torch.tensor([[0.5, 0.0, 0.5]]), concepts), torch.tensor([[1.0, 0.0, 1.0]]) / 2**0.5)


def test_weight_sum_fusion_uses_alpha_in_training_and_alpha_test_at_retrieval() -> None:
    instance, consensus = l2norm(torch.randn(3, 6)), l2norm(torch.randn(3, 6))
    fusion = Fusion("weight_sum", 6, alpha=0.85, alpha_test=0.9)
    _close(fusion.train()(instance, consensus), l2norm(0.85 * instance + 0.15 * consensus))
    _close(fusion.eval()(instance, consensus), l2norm(0.9 * instance + 0.1 * consensus))
    assert not list(fusion.parameters())


def test_concat_fusion_projects_both_embeddings() -> None:
    torch.manual_seed(0)
    instance, consensus = l2norm(torch.randn(3, 6)), l2norm(torch.randn(3, 6))
    fusion = Fusion("concat", 6, alpha=0.85, alpha_test=0.85)
    assert fusion.project.weight.shape == (6, 12)
    expected = l2norm(torch.cat([instance, consensus], 1) @ fusion.project.weight.T + fusion.project.bias)
    _close(fusion(instance, consensus), expected)
    other = fusion(instance, l2norm(torch.randn(3, 6)))
    assert not torch.allclose(other, expected)  # the consensus half matters
    fusion(instance, consensus).sum().backward()
    assert fusion.project.weight.grad.abs().sum() > 0


def test_adaptive_fusion_gates_each_item() -> None:
    instance, consensus = l2norm(torch.randn(3, 6)), l2norm(torch.randn(3, 6))
    fusion = Fusion("adap_sum", 6, alpha=0.85, alpha_test=0.85)
    with torch.no_grad():
        fusion.gate.weight.zero_()
        fusion.gate.bias.fill_(30.0)  # gate ~ 1: the instance embedding
        _close(fusion(instance, consensus), instance, atol=1e-6)
        fusion.gate.bias.fill_(-30.0)  # gate ~ 0: the consensus embedding
        _close(fusion(instance, consensus), consensus, atol=1e-6)
        fusion.gate.bias.zero_()  # gate 1/2
        _close(fusion(instance, consensus), l2norm(instance + consensus))
        fusion.gate.weight.fill_(1.0)  # a gate that differs per item: sigma(sum of the mean embedding)
        gate = torch.sigmoid(((instance + consensus) / 2).sum(1, keepdim=True))
        _close(fusion(instance, consensus), l2norm(gate * instance + (1 - gate) * consensus))


def test_unknown_fusion_is_refused() -> None:
    with pytest.raises(ValueError, match="fusion must be"):
        Fusion("product", 6, alpha=0.5, alpha_test=0.5)  # type: ignore[arg-type]


# --- the KL term and the loss weights ---------------------------------------------------------------------------


def test_kl_term_by_hand() -> None:
    """KL([.5, .5, 0] || [.25, .25, .5]) = ln 2; a second, identical pair adds 0."""
    textual = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    visual = torch.tensor([[0.25, 0.25, 0.5], [0.2, 0.3, 0.5]])
    assert float(concept_kl(visual.log(), textual)) == pytest.approx(math.log(2), abs=1e-6)
    reference = torch.nn.KLDivLoss(reduction="sum")(visual.log(), textual)
    assert float(concept_kl(visual.log(), textual)) == pytest.approx(float(reference), abs=1e-6)


def test_dwa_factors_by_hand() -> None:
    """Ratios r = [1, .5] at T = 2: factors 2 softmax([.5, .25]); the slower term gains weight."""
    factors = dwa_factors(torch.tensor([2.0, 1.0]), torch.tensor([2.0, 2.0]), temperature=2.0)
    expected = 2 * torch.softmax(torch.tensor([0.5, 0.25]), 0)
    _close(factors, expected)
    assert factors[0] > 1 > factors[1] and float(factors.sum()) == pytest.approx(2.0)


def _encodings(n: int, k: int, seed: int) -> tuple[Encoded, Encoded]:
    generator = torch.Generator().manual_seed(seed)

    def unit() -> Tensor:
        return l2norm(torch.randn(n, 4, generator=generator))

    empty = Encoded(torch.zeros(n, 1, 4), torch.ones(n, 1, dtype=torch.bool), unit())
    images = Encoded(
        empty.local,
        empty.mask,
        unit(),
        {"instance": unit(), "consensus": unit(), "concept_log_probs": torch.full((n, k), -math.log(k))},
    )
    texts = Encoded(
        empty.local,
        empty.mask,
        unit(),
        {"instance": unit(), "consensus": unit(), "concept_probs": torch.softmax(torch.randn(n, k), 1)},
    )
    return images, texts  # fmt: skip


def test_consensus_loss_weights_its_four_terms() -> None:
    images, texts = _encodings(5, 3, seed=0)
    loss = ConsensusLoss(0.2, True, (3.0, 5.0, 1.0, 2.0), weighting="fixed", temperature=2.0)
    terms = loss(torch.zeros(5, 5), images, texts)
    expected = 3 * terms["loss_fused"] + 5 * terms["loss_instance"] + terms["loss_consensus"] + 2 * terms["loss_kl"]
    assert float(terms["loss"]) == pytest.approx(float(expected))
    assert float(terms["loss_kl"]) == pytest.approx(float(concept_kl(images.extras["concept_log_probs"],
                                                                     texts.extras["concept_probs"])))  # fmt: skip


@pytest.mark.parametrize("weighting", ["fixed", "dwa"])
def test_loss_weights_follow_the_epoch_means(weighting: str) -> None:
    """Epoch means are taken from the training batches; DWA sets new weights from the third epoch on."""
    loss = ConsensusLoss(0.2, True, (3.0, 5.0, 1.0, 2.0), weighting=weighting, temperature=2.0).train()
    epochs = [_encodings(6, 3, seed=s) for s in (1, 2, 3)]
    means = []
    for images, texts in epochs:
        terms = [loss(torch.zeros(6, 6), images, texts) for _ in range(2)]  # two identical batches per epoch
        means.append(torch.stack([terms[0][f"loss_{n}"] for n in ("fused", "instance", "consensus", "kl")]))
        reported = loss.end_epoch()
        assert set(reported) == {"weight_fused", "weight_instance", "weight_consensus", "weight_kl"}
        if len(means) < 2 or weighting == "fixed":
            _close(loss.weights, torch.tensor([3.0, 5.0, 1.0, 2.0]))
    if weighting == "dwa":
        expected = torch.tensor([3.0, 5.0, 1.0, 2.0]) * dwa_factors(means[2].double(), means[1].double(), 2.0).float()
        _close(loss.weights, expected, atol=1e-5)
        assert not torch.allclose(loss.weights, torch.tensor([3.0, 5.0, 1.0, 2.0]))
    loss.eval()(torch.zeros(6, 6), *epochs[0])  # evaluation batches are not counted
    assert float(loss.running.abs().sum()) == 0


# --- instance attention ----------------------------------------------------------------------------------------


def test_memory_attention_is_a_masked_convex_combination() -> None:
    torch.manual_seed(0)
    attention = MemoryAttention(8, dropout=0.0, batch_norm=True).eval()
    fragments = l2norm(torch.randn(2, 5, 8))
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    out = attention(fragments, mask, fragments.mean(1))
    with torch.no_grad():
        keys = attention.fragment_norm(attention.fragment(fragments).reshape(10, 8)).reshape(2, 5, 8)  # eval BN
        query = attention.memory_norm(attention.memory(fragments.mean(1)))
        logits = attention.score(torch.tanh(keys) * torch.tanh(query)[:, None])
        weights = torch.softmax(logits.squeeze(-1).masked_fill(~mask, float("-inf")), 1)
    _close(out, l2norm((weights[..., None] * fragments).sum(1)), atol=1e-5)
    assert weights[0, 3:].sum() == 0


def test_multi_head_attention_ignores_padding() -> None:
    torch.manual_seed(0)
    attention = MultiHeadMemoryAttention(8, heads=4, dropout=0.0).eval()
    fragments = l2norm(torch.randn(2, 3, 8))
    mask = torch.tensor([[True, True, False], [True, True, True]])
    memory = fragments.mean(1)
    noisy = fragments.clone()
    noisy[0, 2] = 100.0
    _close(attention(noisy, mask, memory), attention(fragments, mask, memory), atol=1e-6)
    assert len(attention.attention.in_proj_weight) == 3 * 8  # Q, K, V projections, split into 4 heads of 2


# --- builders, GloVe inputs, labels -------------------------------------------------------------------------------


def _concepts(words: tuple[str, ...]) -> Concepts:
    cooccurrence = np.diag(np.arange(len(words)) + 5) + 2
    return Concepts(words, tuple(np.diag(cooccurrence)), cooccurrence, 20)


def test_glove_vectors_initialise_the_concept_inputs(tmp_path: Path) -> None:
    glove = tmp_path / "glove.txt"
    glove.write_text("red 1 2 3\nthe 0 0 0\nstar 4 5 6\nred 7 7 7\n", encoding="utf-8")
    assert {w: v.tolist() for w, v in read_word_vectors(glove, ["red", "star", "moon"], 3).items()} == {
        "red": [1.0, 2.0, 3.0], "star": [4.0, 5.0, 6.0]}  # fmt: skip
    params = TypeAdapter(MatcherParams).validate_python(
        {"kind": "cvse", "embed_dim": 8, "word_dim": 4, "concept_input_dim": 3, "glove_path": str(glove)}
    )
    concepts = _concepts(("star", "moon", "red"))
    inputs = build_matcher(params, inputs_for_training(params, 5, 10, concepts)).image_encoder.graph.inputs
    _close(inputs[0], torch.tensor([4.0, 5.0, 6.0]))
    _close(inputs[2], torch.tensor([1.0, 2.0, 3.0]))
    random = build_matcher(params, MatcherInputs(5, 10, concepts)).image_encoder.graph.inputs  # a saved model's
    _close(inputs[1], random[1])  # "moon" is not in the file: it keeps its (seeded) random vector
    assert not torch.allclose(random[0], inputs[0])


@pytest.mark.parametrize(
    ("content", "message"),
    [("red 1 2\n", "'red' has a 2-d vector; expected 3-d"), ("red 1 x 3\n", "not a list of numbers")],
)
def test_bad_glove_lines_are_named(tmp_path: Path, content: str, message: str) -> None:
    glove = tmp_path / "glove.txt"
    glove.write_text("blue 1 1 1\n" + content, encoding="utf-8")
    with pytest.raises(UserError, match=f"glove.txt:2: .*{message}"):
        read_word_vectors(glove, ["red"], 3)
    with pytest.raises(UserError, match="GloVe file not found"):
        read_word_vectors(tmp_path / "missing.txt", ["red"], 3)


def test_the_text_side_mixes_labels_by_beta() -> None:
    """With beta = 1 the textual concept distribution is the labels' softmax(10 y), whatever is predicted."""
    params = TypeAdapter(MatcherParams).validate_python(
        {"kind": "cvse", "embed_dim": 8, "word_dim": 4, "label_ratio": 1.0}
    )
    matcher = build_matcher(params, MatcherInputs(5, 10, _concepts(("a", "b", "c")))).eval()
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    image = np.zeros((1, 5), np.float16)
    captions = PairCollator(pad_regions, 3)([(image, [1, 2, 3], [0]), (image, [1, 4], [1, 2])])[1]
    _close(captions.concepts, labels)
    with torch.no_grad():
        encoded = matcher.encode_text(captions)
    _close(encoded.extras["concept_probs"], label_distribution(labels, 10.0))


def test_concept_matchers_need_concepts() -> None:
    params = TypeAdapter(MatcherParams).validate_python({"kind": "mh_cvse", "embed_dim": 8, "word_dim": 4, "heads": 2})
    with pytest.raises(UserError, match="mh_cvse needs the concept vocabulary"):
        build_matcher(params, MatcherInputs(5, 10, None))


def test_training_labels_are_the_image_union() -> None:
    table = CaptionTable(np.arange(4), np.array([7, 7, 8, 7]), [[1], [1], [1], [1]], [[2], [0, 3], [], [2, 5]])
    assert image_concepts(table).concept_ids == [[0, 2, 3, 5], [0, 2, 3, 5], [], [0, 2, 3, 5]]
