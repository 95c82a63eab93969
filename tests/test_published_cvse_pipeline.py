"""A CVSE checkpoint with its concept files, imported through `dvc repro` on the tiny pipeline (36 regions per
image, as CVSE's region-slot BatchNorm needs): `train@` converts it, `evaluate@` scores it as CVSE's own code does,
`compare` lists it."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from itm.data.regions import RegionStore
from itm.data.text import tokenize
from itm.data.vocab import SPECIALS
from itm.evaluate.score_file import SplitScores
from itm.measurements import read_record
from tests import cvse_original as cvse
from tests.tiny_repo import make_tiny_repo, run

NAME = "cvse_published"
N_CONCEPTS, EMBED, WORD_DIM, INPUT_DIM = 12, 16, 8, 6


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _published(repo: Path, folder: Path) -> tuple[dict[str, object], cvse.CvseModel, list[str], list[str], np.ndarray]:
    """CVSE's files for the tiny data: the vocabulary of the train captions (nltk tokens, as SCAN's vocab.py builds
    it), the most frequent longer words as concepts with their train co-occurrences, random concept vectors; the
    `weights:` block naming them, the model, its words and concepts, and the concept vectors."""
    texts = pq.read_table(repo / "data" / "captions" / "train.parquet").column("text").to_pylist()
    tokens = [tokenize(text, "nltk") for text in texts]
    counts = Counter(token for caption in tokens for token in caption)
    words = [*SPECIALS, *counts]
    concepts = [word for word, _ in counts.most_common() if word.isalpha() and len(word) > 3][:N_CONCEPTS]
    adjacency = cvse.adjacency_content(concepts, tokens)
    vectors = np.random.default_rng(5).normal(size=(len(concepts), INPUT_DIM))
    feature_dim = RegionStore(repo / "data" / "regions" / "train").feature_dim
    opt = cvse.options(img_dim=feature_dim, embed_size=EMBED, word_dim=WORD_DIM, vocab_size=len(words),
                       num_attribute=len(concepts), input_channel=INPUT_DIM)  # fmt: skip
    model = cvse.CvseModel(opt, adjacency, seed=11)
    folder.mkdir()
    cvse.save_checkpoint(model, folder / "model_best.pth.tar", legacy=True)
    cvse.write_vocabulary(words, folder / "f30k_precomp_vocab.pkl")
    categories, graph, glove = cvse.write_concept_files(folder, concepts, adjacency, vectors)
    weights = {"source": str(folder / "model_best.pth.tar"), "sha256": _sha256(folder / "model_best.pth.tar"),
               "layout": "cvse", "vocab": {"source": str(folder / "f30k_precomp_vocab.pkl")},
               "concepts": {"categories": {"source": str(categories)}, "adjacency": {"source": str(graph)},
                            "word_vectors": {"source": str(glove)}, "lemmas": "wordnet"}}  # fmt: skip
    return weights, model, words, concepts, vectors


@pytest.mark.slow
def test_a_cvse_checkpoint_is_imported_evaluated_and_compared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_tiny_repo(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["regions"] |= {"min_boxes": 36, "max_boxes": 36}  # CVSE's BatchNorm1d(36) over region slots
    # enough proposals for 36 regions in every tiny image
    params["detector"]["architectures"]["small"] |= {"rpn_pre_nms_test": 400, "rpn_post_nms_test": 100,
                                                     "rpn_nms_threshold": 0.95}  # fmt: skip
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro", "regions", "tokenize"], repo)
    weights, model, words, concepts, vectors = _published(repo, tmp_path / "cvse")
    # a WordNet database in miniature that knows every vocabulary word as a noun and no irregular plural
    wordnet = tmp_path / "wordnet"
    wordnet.mkdir()
    (wordnet / "index.noun").write_text("".join(f"{word} n 1 0 1 0 00000001\n" for word in sorted(words[4:])))
    (wordnet / "noun.exc").write_text("")
    monkeypatch.setenv("WNSEARCHDIR", str(wordnet))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["matchers"] = {NAME: {"kind": "cvse", "weights": weights}}
    params["evaluate"]["ensembles"] = {}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    done = run(["dvc", "repro", "compare"], repo)
    assert f"Running stage 'train@{NAME}-0'" in done.stdout
    card = json.loads((repo / "models" / NAME / "seed0" / "card.json").read_text())
    assert card["weights"]["layout"] == "cvse" and card["best_rsum"] == pytest.approx(497.6)
    assert card["params"]["region_norm"] == "slots" and card["params"]["caption_concepts"] == "words"
    assert NAME in (repo / "reports" / "comparison.md").read_text()

    # the test scores equal CVSE's own code on the same regions and caption texts, for every caption whose words are
    # all in the vocabulary (CVSE lemmatises a word outside it too, "diamonds" -> diamond; we read it as <unk>)
    score_file = repo / "data" / "scores" / NAME / "seed0.npz"
    scores = SplitScores.load(score_file)
    store = RegionStore(repo / "data" / "regions" / "test")
    table = pq.read_table(repo / "data" / "captions" / "test.parquet").to_pydict()
    text_of = dict(zip(table["caption_id"], table["text"], strict=True))
    texts = [text_of[int(c)] for c in scores.caption_ids]
    lemmatize = cvse.nltk_lemmatizer(set(words[4:]), {})
    labels = torch.from_numpy(np.stack([cvse.caption_labels(text, concepts, lemmatize) for text in texts]))
    token_ids = [cvse.encode_caption(words, text) for text in texts]
    image_ids = scores.image_ids[:8]
    features = torch.stack([torch.from_numpy(np.asarray(store.features_of(int(i)), dtype=np.float32))
                            for i in image_ids])  # fmt: skip
    assert features.shape[1] == 36
    expected = model.scores(features, token_ids, labels, vectors)
    known = set(words)
    in_vocabulary = torch.tensor([all(token in known for token in tokenize(text, "nltk")) for text in texts])
    assert in_vocabulary.float().mean() > 0.9
    ours = scores.scores[: len(image_ids)]
    torch.testing.assert_close(ours[:, in_vocabulary], expected[:, in_vocabulary], atol=1e-5, rtol=0)

    # CVSE's own protocol: the converted model's labels are completed from the neighbouring test captions
    metrics_file = repo / "metrics" / NAME / "seed0.json"
    assert json.loads(metrics_file.read_text())["test/transductive_concepts"] == 0
    run(["dvc", "exp", "run", f"evaluate@{NAME}-0", "-S", "evaluate.transductive_concepts=true"], repo)
    completed = json.loads(metrics_file.read_text())
    assert completed["test/transductive_concepts"] == 1
    timing = read_record(repo / "data" / "work" / "evaluate" / NAME / "seed0", score_file)  # the run's times
    assert timing is not None and timing["test/completion_seconds"] > 0
    assert SplitScores.load(score_file).scores.ne(scores.scores).any()
