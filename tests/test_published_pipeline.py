"""A SCAN checkpoint in its original format, imported through `dvc repro` on the tiny pipeline: `train@` converts it,
`evaluate@` scores it as SCAN's own code does, `compare` lists it; a wrong checksum stops the stage with one line."""

from __future__ import annotations

import hashlib
import json
import subprocess
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
from tests import scan_original as scan
from tests.tiny_repo import environment, make_tiny_repo, run

NAME = "scan_published"
MODEL = Path("models", NAME, "seed0")  # train@scan_published-0's output: a conversion, the same for every seed


def _published_checkpoint(repo: Path, folder: Path) -> dict[str, object]:
    """SCAN's files for a t-i AVG model over the tiny regions, its vocabulary from the train captions as SCAN's
    vocab.py builds it (nltk tokens, in order of first appearance); the `weights:` block naming them."""
    texts = pq.read_table(repo / "data" / "captions" / "train.parquet").column("text").to_pylist()
    counts = Counter(token for text in texts for token in tokenize(text, "nltk"))
    words = [*SPECIALS, *counts]
    feature_dim = RegionStore(repo / "data" / "regions" / "train").feature_dim
    opt = scan.options(img_dim=feature_dim, embed_size=16, word_dim=8, vocab_size=len(words), bi_gru=True,
                       cross_attn="t2i", agg_func="Mean", max_violation=True)  # fmt: skip
    folder.mkdir()
    scan.save_checkpoint(scan.ScanModel(opt, seed=11), folder / "model_best.pth.tar", legacy=True)
    scan.serialize_vocab(words, folder / "f30k_precomp_vocab.json")
    sha256 = hashlib.sha256((folder / "model_best.pth.tar").read_bytes()).hexdigest()
    return {"source": str(folder / "model_best.pth.tar"), "sha256": sha256, "layout": "scan",
            "vocab": {"source": str(folder / "f30k_precomp_vocab.json")}}  # fmt: skip


def _only_matcher(weights: dict[str, object]) -> list[str]:
    """The `-S` overrides of docs/reproduction.md: the published model as the only matcher, and no ensembles."""
    vocab = weights["vocab"]["source"]  # type: ignore[index]
    block = (f"{{kind: scan, weights: {{source: {weights['source']}, sha256: {weights['sha256']}, layout: scan, "
             f"vocab: {{source: {vocab}}}}}}}")  # fmt: skip
    overrides = ["~matchers", f"+matchers={{{NAME}: {block}}}", "~evaluate.ensembles", "+evaluate.ensembles={}"]
    return [argument for override in overrides for argument in ("-S", override)]


def _set_matchers(repo: Path, weights: dict[str, object]) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["matchers"] = {NAME: {"kind": "scan", "weights": weights}}
    params["evaluate"]["ensembles"] = {}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_a_scan_checkpoint_is_imported_evaluated_and_compared(tmp_path: Path) -> None:
    repo = make_tiny_repo(tmp_path / "repo")
    run(["dvc", "repro", "regions", "tokenize"], repo)
    weights = _published_checkpoint(repo, tmp_path / "scan")

    done = run(["dvc", "exp", "run", "compare", *_only_matcher(weights)], repo)
    assert f"Running stage 'train@{NAME}-0'" in done.stdout
    assert yaml.safe_load((repo / "params.yaml").read_text())["matchers"][NAME]["weights"]["layout"] == "scan"
    card = json.loads((repo / MODEL / "card.json").read_text())
    assert card["weights"] == {"source": weights["source"], "sha256": weights["sha256"], "layout": "scan"}
    assert card["options"]["cross_attn"] == "t2i" and card["best_rsum"] == pytest.approx(446.2)
    assert card["params"]["pooling"] == "avg" and card["tokenization"] == "nltk"
    report = (repo / "reports" / "comparison.md").read_text()
    assert f"| {NAME} | single, imported | scan | fair |" in report
    assert "There are no published figures for the synthetic dataset" in report

    # the test scores equal SCAN's own code on the same regions and caption texts (each image on its own: the tiny
    # images have different numbers of regions, which SCAN's 36 fixed boxes never do)
    scores = SplitScores.load(repo / "data" / "scores" / NAME / "seed0.npz")
    store = RegionStore(repo / "data" / "regions" / "test")
    table = pq.read_table(repo / "data" / "captions" / "test.parquet").to_pydict()
    text_of = dict(zip(table["caption_id"], table["text"], strict=True))
    words = json.loads(Path(str(weights["vocab"]["source"])).read_text())["idx2word"]  # type: ignore[index]
    words = [words[str(i)] for i in range(len(words))]
    checkpoint = torch.load(weights["source"], weights_only=False)  # type: ignore[arg-type]  (our own test file)
    original = scan.ScanModel(checkpoint["opt"], seed=0)
    state = checkpoint["model"]
    original.img_enc.load_state_dict(state[0])
    original.txt_enc.load_state_dict(state[1])
    token_ids = [scan.encode_caption(words, tokenize(text_of[int(c)], "nltk")) for c in scores.caption_ids]
    for row, image_id in enumerate(scores.image_ids[:8]):
        features = torch.from_numpy(np.asarray(store.features_of(int(image_id)), dtype=np.float32))[None]
        expected = original.scores(features, token_ids)[0]
        torch.testing.assert_close(scores.scores[row], expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_a_wrong_checksum_stops_the_conversion_with_one_line(tmp_path: Path) -> None:
    repo = make_tiny_repo(tmp_path / "repo")
    run(["dvc", "repro", "regions", "tokenize"], repo)
    weights = _published_checkpoint(repo, tmp_path / "scan") | {"sha256": "0" * 64}
    _set_matchers(repo, weights)
    command = ["python", "-m", "stages.train", "--matcher", NAME, "--regions", "data/regions", "--captions",
               "data/captions", "--out", str(MODEL), "--work", f"data/work/train/{NAME}/seed0"]  # fmt: skip
    done = subprocess.run(command, cwd=repo, env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "sha256" in errors[0], done.stderr
    assert not (repo / MODEL).exists()
