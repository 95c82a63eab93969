"""CVSE checkpoints and concept files, written as BruceW91/CVSE writes them (tests/cvse_original.py), converted into
our `cvse` matcher in CVSE's layout: the scores equal CVSE's own code on the same inputs, a caption's concepts are
its words' WordNet lemmas as in CVSE's test loader, the saved model rebuilds itself, and bad files are refused."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from itm.config import CvseParams, MhCvseParams, PublishedWeights, ScanParams
from itm.data.batches import Captions, Regions
from itm.data.concepts import Concepts
from itm.data.loaders import pad_captions
from itm.errors import UserError
from itm.models import Matcher, MatcherInputs, build_matcher, load_matcher, save_matcher
from itm.models.cvse import MemoryAttention
from itm.models.encoders import l2norm
from itm.safe_load import NAMESPACE_STAND_IN, load_torch
from itm.train.published import Converted, convert_checkpoint
from itm.train.published import cvse as published_cvse
from itm.train.published.cvse import WordNetNouns, read_cvse_concepts
from itm.train.published.vocabulary import read_published_vocab
from tests import cvse_original as cvse
from tests import scan_original as scan

WORDS = ("<pad>", "<start>", "<end>", "<unk>", "a", "man", "men", "dog", "dogs", "hat", "hats", "red", "child",
         "children", "runs", "run", "on", "the", "grass", "in", "with", ",", ".", "!", "and", "two",
         "glasses")  # fmt: skip
CONCEPTS = ("man", "men", "dog", "hat", "red", "children", "child", "dogs", "runs", "grass", "glass")
CAPTIONS = ["A man, in a red hat.", "Two dogs run on the grass.", "Men and children with dogs.",
            "a man runs in a hat", "Red, red, red!", "the child with glasses runs"]  # fmt: skip
TRAIN = ["a man in a red hat", "two dogs on the grass", "men and children", "a child with a dog", "red hats",
         "the man runs", "a dog runs on the grass", "children with glass", "a red dog", "men in hats"]  # fmt: skip
# a WordNet database in miniature: the noun index and the irregular plurals
NOUNS = {"man", "dog", "hat", "red", "child", "run", "grass", "glass", "glasses", "two"}
EXCEPTIONS = {"men": ["man"], "children": ["child"]}
FEATURE_DIM, EMBED, WORD_DIM, INPUT_DIM, REGIONS = 12, 8, 6, 5, 36


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wordnet(folder: Path) -> Path:
    """index.noun (lemma first on each line, licence lines indented) and noun.exc in WordNet's format."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["  1 This software and database is being provided to you", *(f"{n} n 1 0 1 0 00000001" for n in NOUNS)]
    (folder / "index.noun").write_text("\n".join(sorted(lines)) + "\n")
    (folder / "noun.exc").write_text("".join(f"{form} {' '.join(bases)}\n" for form, bases in EXCEPTIONS.items()))
    return folder


@pytest.fixture(autouse=True)
def wordnet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = _wordnet(tmp_path / "wordnet")
    monkeypatch.setattr(published_cvse, "wordnet_folders", lambda: [folder])
    return folder


class Files:
    """A CVSE checkpoint, its concept files and its vocabulary pickle, written in `folder`."""

    def __init__(self, folder: Path, opt: argparse.Namespace, *, legacy: bool = False, seed: int = 3) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.adjacency_content = cvse.adjacency_content(CONCEPTS, [text.split() for text in TRAIN])
        self.vectors = np.random.default_rng(seed).normal(size=(len(CONCEPTS), INPUT_DIM))
        self.model = cvse.CvseModel(opt, self.adjacency_content, seed=seed)
        self.checkpoint = folder / "model_best.pth.tar"
        cvse.save_checkpoint(self.model, self.checkpoint, legacy=legacy)
        self.categories, self.adjacency, self.glove = cvse.write_concept_files(
            folder, CONCEPTS, self.adjacency_content, self.vectors
        )
        self.vocab = folder / "f30k_precomp_vocab.pkl"
        cvse.write_vocabulary(WORDS, self.vocab)

    def weights(self, **concepts: object) -> PublishedWeights:
        files = {"categories": {"source": str(self.categories)}, "adjacency": {"source": str(self.adjacency)},
                 "word_vectors": {"source": str(self.glove)}}  # fmt: skip
        return PublishedWeights(source=str(self.checkpoint), sha256=_sha256(self.checkpoint), layout="cvse",
                                vocab={"source": str(self.vocab)}, concepts=files | concepts)  # fmt: skip

    def convert(self, block: CvseParams | None = None, *, lemmas: str = "wordnet") -> Converted:
        weights = self.weights(lemmas=lemmas)
        block = block or CvseParams(kind="cvse", weights=weights)
        concepts = read_cvse_concepts(self.categories, self.adjacency, self.glove, lemmas=lemmas)  # type: ignore[arg-type]
        content = load_torch(self.checkpoint, NAMESPACE_STAND_IN)
        return convert_checkpoint(self.checkpoint, weights, content, block, read_published_vocab(self.vocab),
                                  concepts=concepts)  # fmt: skip


def _options(**changes: object) -> argparse.Namespace:
    sizes = {"img_dim": FEATURE_DIM, "embed_size": EMBED, "word_dim": WORD_DIM, "vocab_size": len(WORDS),
             "num_attribute": len(CONCEPTS), "input_channel": INPUT_DIM}  # fmt: skip
    return cvse.options(**(sizes | changes))


def _features(n_images: int = 5, regions: int = REGIONS) -> torch.Tensor:
    return torch.randn(n_images, regions, FEATURE_DIM, generator=torch.Generator().manual_seed(7))


def _captions(matcher: Matcher, captions: list[str]) -> Captions:
    """The captions as the data loaders give them to the matcher: its own token ids and its own concept labels."""
    assert matcher.tokenizer is not None and matcher.labeller is not None
    token_ids = matcher.tokenizer(captions)
    return pad_captions(token_ids, matcher.labeller(token_ids), matcher.n_concepts)


def _labels(matcher: Matcher, captions: list[str]) -> torch.Tensor:
    labels = _captions(matcher, captions).concepts
    assert labels is not None
    return labels


def _our_scores(converted: Converted, features: torch.Tensor, captions: list[str]) -> torch.Tensor:
    matcher = converted.matcher
    with torch.no_grad():
        images = matcher.encode_image(Regions(features, torch.ones(features.shape[:2], dtype=torch.bool)))
        return matcher.score(images, matcher.encode_text(_captions(matcher, captions)))


def _cvse_scores(files: Files, features: torch.Tensor, captions: list[str]) -> torch.Tensor:
    lemmatize = cvse.nltk_lemmatizer(NOUNS, EXCEPTIONS)
    labels = torch.from_numpy(np.stack([cvse.caption_labels(text, CONCEPTS, lemmatize) for text in captions]))
    token_ids = [cvse.encode_caption(WORDS, text) for text in captions]
    return files.model.scores(features, token_ids, labels, files.vectors)


@pytest.mark.parametrize(
    ("data_name", "bi_gru", "legacy"),
    [("f30k_precomp", True, False), ("coco_precomp", True, True), ("f30k_precomp", False, True)],
)
def test_converted_cvse_scores_equal_cvses_own_code(tmp_path: Path, data_name: str, bi_gru: bool, legacy: bool) -> None:
    files = Files(tmp_path / "cvse", _options(data_name=data_name, bi_gru=bi_gru, Concept_label_ratio=0.4),
                  legacy=legacy)  # fmt: skip
    converted = files.convert()
    params = converted.params
    assert (params.region_norm, params.region_slots, params.caption_concepts) == ("slots", 36, "words")
    assert params.fusion_alpha_test == (0.9 if data_name == "coco_precomp" else 0.85)
    assert (params.label_ratio, params.bidirectional, params.embed_dim) == (0.4, bi_gru, EMBED)
    # it labels captions itself, from their token ids, instead of reading the tokenize stage's labels
    assert converted.matcher.n_concepts == len(CONCEPTS) and converted.matcher.labeller is not None
    assert converted.concepts is not None and converted.concepts.words == CONCEPTS

    ours = _our_scores(converted, _features(), CAPTIONS)
    assert ours.shape == (5, len(CAPTIONS))
    torch.testing.assert_close(ours, _cvse_scores(files, _features(), CAPTIONS), atol=1e-5, rtol=0)


def test_a_captions_concepts_are_its_words_wordnet_lemmas(tmp_path: Path) -> None:
    converted = Files(tmp_path / "cvse", _options()).convert()
    lemmatize = cvse.nltk_lemmatizer(NOUNS, EXCEPTIONS)
    labels = _labels(converted.matcher, CAPTIONS)
    expected = np.stack([cvse.caption_labels(text, CONCEPTS, lemmatize) for text in CAPTIONS])
    np.testing.assert_array_equal(labels.numpy(), expected)
    # a word marks the first concept of its lemma: "men" -> man (not men), "dogs" -> dog, "children" -> child,
    # whose first concept is "children" (CVSE's `name_concepts.index`)
    assert [CONCEPTS[i] for i in np.flatnonzero(expected[2])] == ["man", "dog", "children"]
    # "glasses" is a WordNet noun, but its shortest form "glass" wins (min by length)
    assert [CONCEPTS[i] for i in np.flatnonzero(expected[5])] == ["children", "runs", "glass"]
    # a word outside the vocabulary marks nothing here (CVSE would lemmatise the raw token: "grasses" -> grass)
    assert not _labels(converted.matcher, ["grasses"]).any()


def test_exact_lemmas_match_the_words_as_they_are(tmp_path: Path) -> None:
    converted = Files(tmp_path / "cvse", _options()).convert(lemmas="exact")
    labels = _labels(converted.matcher, CAPTIONS[2:3])
    assert [CONCEPTS[i] for i in np.flatnonzero(labels[0].numpy())] == ["men", "children", "dogs"]


def test_wordnet_nouns_lemmatise_as_nltk(wordnet: Path) -> None:
    nltk = cvse.nltk_lemmatizer(NOUNS, EXCEPTIONS)
    ours = WordNetNouns(wordnet)
    for word in ["men", "children", "dogs", "glasses", "grass", "grasses", "hats", "runs", "two", "xyz", "buses"]:
        assert ours.lemmatize(word) == nltk(word), word


def test_the_saved_model_rebuilds_itself(tmp_path: Path) -> None:
    files = Files(tmp_path / "cvse", _options())
    converted = files.convert()
    vocab = read_published_vocab(files.vocab)
    card = {"params": converted.params.model_dump(mode="json"), "feature_dim": FEATURE_DIM, "vocab_size": len(vocab),
            "vocab_digest": vocab.digest(), "concepts_digest": None}  # fmt: skip
    state = {key: value.clone() for key, value in converted.matcher.state_dict().items()}
    save_matcher(tmp_path / "model", state, card, concepts=converted.concepts, vocab=vocab)
    loaded, _ = load_matcher(tmp_path / "model", torch.device("cpu"))
    rebuilt = Converted(loaded, converted.params, converted.options, FEATURE_DIM, converted.concepts)
    torch.testing.assert_close(_our_scores(rebuilt, _features(), CAPTIONS), _our_scores(converted, _features(),
                                                                                         CAPTIONS))  # fmt: skip
    assert loaded.labeller is not None and loaded.image_encoder.attention.slots == 36


def test_a_region_count_other_than_36_is_refused(tmp_path: Path) -> None:
    converted = Files(tmp_path / "cvse", _options()).convert()
    with pytest.raises(UserError, match=r"region_norm 'slots' normalises each of 36 region slots, but an image has 20"):
        _our_scores(converted, _features(regions=20), CAPTIONS)
    features, mask = _features(2), torch.ones(2, REGIONS, dtype=torch.bool)
    mask[1, 30:] = False  # padded: the second image has 30 regions
    with pytest.raises(UserError, match="but an image has 30 regions"), torch.no_grad():
        converted.matcher.encode_image(Regions(features, mask))


def test_a_scan_checkpoint_is_not_a_cvse_one(tmp_path: Path) -> None:
    files = Files(tmp_path / "cvse", _options())
    opt = scan.options(img_dim=FEATURE_DIM, embed_size=EMBED, word_dim=WORD_DIM, vocab_size=len(WORDS))
    scan.save_checkpoint(scan.ScanModel(opt), files.checkpoint)
    with pytest.raises(UserError, match=r"not a CVSE checkpoint \(layout cvse\), whose `model` holds 2 state dicts"):
        files.convert()


def test_a_concept_file_with_another_number_of_concepts_is_refused(tmp_path: Path) -> None:
    files = Files(tmp_path / "cvse", _options())
    cvse.write_concept_files(tmp_path / "cvse", CONCEPTS[:-1], files.adjacency_content, files.vectors)
    with pytest.raises(UserError, match=r"f30k_adj_concepts.pkl: shape \(11,\) does not fit the 10 concepts"):
        files.convert()
    smaller = cvse.adjacency_content(CONCEPTS[:-1], [text.split() for text in TRAIN])
    cvse.write_concept_files(tmp_path / "cvse", CONCEPTS[:-1], smaller, files.vectors[:-1])
    with pytest.raises(UserError, match="trained with num_attribute=11, but the concept files hold 10 concepts"):
        files.convert()


def test_an_adjacency_file_of_other_counts_is_not_the_checkpoints(tmp_path: Path) -> None:
    files = Files(tmp_path / "cvse", _options())
    other = cvse.adjacency_content(CONCEPTS, [text.split() for text in TRAIN[:6]] + [list(CONCEPTS)])
    cvse.write_concept_files(tmp_path / "cvse", CONCEPTS, other, files.vectors)
    with pytest.raises(UserError, match=r"its concept graph .* is not the one the adjacency file gives"):
        files.convert()


def test_a_tensor_of_another_shape_is_named(tmp_path: Path) -> None:
    files = Files(tmp_path / "cvse", _options())
    content = torch.load(files.checkpoint, weights_only=False)
    content["model"][2]["embedding_1.1.running_mean"] = torch.zeros(20)
    torch.save(content, files.checkpoint)
    with pytest.raises(UserError, match=r"mis-shaped: image_encoder\.attention\.fragment_norm\.running_mean \(20,\) "
                                        r"\(expected \(36,\)\)"):  # fmt: skip
        files.convert()
    content["model"][6]["extra"] = torch.zeros(1)
    torch.save(content, files.checkpoint)
    with pytest.raises(UserError, match="C_GCN is not CVSE's"):
        files.convert()


def test_options_the_cvse_matcher_does_not_build_are_refused(tmp_path: Path) -> None:
    files = Files(tmp_path / "a", _options(feature_fuse_type="multiple"))
    with pytest.raises(UserError, match="trained with feature_fuse_type='multiple'; the cvse matcher builds"):
        files.convert()
    files = Files(tmp_path / "b", _options(data_name="f8k_precomp"))
    with pytest.raises(UserError, match="data_name='f8k_precomp'"):
        files.convert()


def test_a_key_the_block_sets_must_agree_with_the_checkpoint(tmp_path: Path) -> None:
    files = Files(tmp_path / "cvse", _options())
    with pytest.raises(UserError, match=r"label_ratio is 0\.5, but the checkpoint .* has 0\.35"):
        files.convert(CvseParams(kind="cvse", weights=files.weights(), label_ratio=0.5))
    with pytest.raises(UserError, match=r"region_norm is 'features', but .* has 'slots' .CVSE's code."):
        files.convert(CvseParams(kind="cvse", weights=files.weights(), region_norm="features"))


def test_without_wordnet_the_conversion_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = Files(tmp_path / "cvse", _options())
    monkeypatch.setattr(published_cvse, "wordnet_folders", lambda: [tmp_path / "nowhere"])
    with pytest.raises(UserError, match=r"apt-get install wordnet-base.*or set weights.concepts.lemmas: exact"):
        files.convert()


def test_the_schema_ties_concept_files_to_the_cvse_layout(tmp_path: Path) -> None:
    files = Files(tmp_path / "cvse", _options())
    weights = files.weights().model_dump()
    with pytest.raises(ValidationError, match="layout cvse needs `concepts`"):
        PublishedWeights(**(weights | {"concepts": None}))
    with pytest.raises(ValidationError, match="`concepts` belong to layout cvse"):
        PublishedWeights(**(weights | {"layout": "scan"}))
    with pytest.raises(ValidationError, match=r"categories.source not set"):
        PublishedWeights(**(weights | {"concepts": weights["concepts"] | {"categories": {}}}))
    with pytest.raises(ValidationError, match=r"caption_concepts 'words' .* needs `weights`"):
        CvseParams(kind="cvse", caption_concepts="words")
    with pytest.raises(ValidationError, match="region_norm 'slots' is CVSE's visual BatchNorm; mh_cvse has none"):
        MhCvseParams(kind="mh_cvse", region_norm="slots")
    with pytest.raises(ValidationError, match=r"weights.layout 'cvse' does not build a 'scan' matcher"):
        ScanParams(kind="scan", weights=weights)


def test_slot_batch_norm_trains_as_cvses_visual_attention() -> None:
    torch.manual_seed(0)
    original = cvse.V_single_modal_atten(EMBED, EMBED, dropout_rate=0.0, img_region_num=REGIONS).train()
    ours = MemoryAttention(EMBED, dropout=0.0, batch_norm=True, slots=REGIONS).train()
    names = {"fc1": "fragment", "embedding_1.1": "fragment_norm", "fc2": "memory", "embedding_2.1": "memory_norm",
             "fc3": "score"}  # fmt: skip
    state = original.state_dict()
    ours.load_state_dict({f"{names[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}": v for k, v in state.items()
                          if k.rsplit(".", 1)[0] in names})  # fmt: skip
    regions = l2norm(torch.randn(4, REGIONS, EMBED))
    expected = original(regions, regions.mean(1))  # batch statistics per region slot
    torch.testing.assert_close(ours(regions, torch.ones(4, REGIONS, dtype=torch.bool), regions.mean(1)), expected)
    torch.testing.assert_close(ours.fragment_norm.running_var, original.embedding_1[1].running_var)


def test_a_cvse_with_region_slots_trains() -> None:
    params = CvseParams(
        kind="cvse", embed_dim=EMBED, word_dim=WORD_DIM, concept_input_dim=INPUT_DIM, region_norm="slots"
    )
    cooccurrence = cvse.adjacency_content(CONCEPTS, [text.split() for text in TRAIN])["adj_all"].astype(np.int64)
    np.fill_diagonal(cooccurrence, 3)
    ours = Concepts(CONCEPTS, (3,) * len(CONCEPTS), cooccurrence, len(TRAIN))
    matcher = build_matcher(params, MatcherInputs(FEATURE_DIM, len(WORDS), ours)).train()
    captions = pad_captions([[1, 5, 9, 2], [1, 7, 2], [1, 12, 14, 18, 2], [1, 11, 2]], [[0, 3], [2], [6], []],
                            len(CONCEPTS))  # fmt: skip
    losses = matcher(Regions(_features(4), torch.ones(4, REGIONS, dtype=torch.bool)), captions)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and matcher.image_encoder.attention.fragment.weight.grad is not None
