"""SCAN checkpoints, written as kuanghuei/SCAN writes them (tests/scan_original.py), converted into our `scan`
matcher: the scores equal SCAN's own code on the same inputs, captions are tokenised as SCAN tokenised them, and
bad files are refused with one line without running anything in them."""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
from pathlib import Path

import pytest
import torch

from itm.config import PublishedWeights, ScanParams
from itm.data.batches import Regions
from itm.data.loaders import pad_captions
from itm.errors import UserError
from itm.safe_load import NAMESPACE_STAND_IN, load_pickle, load_torch
from itm.train.published import convert_checkpoint
from itm.train.published.vocabulary import read_published_vocab
from tests import scan_original as scan

WORDS = ("<pad>", "<start>", "<end>", "<unk>", "a", "man", ",", "in", "hat", ".", "dog", "'s", "red", "runs", "two")
CAPTIONS = ["A man, in a red hat.", "Two dogs run.", "A dog's hat.", "a man runs in a hat", "Red, red, red!"]
FEATURE_DIM, EMBED, WORD_DIM, REGIONS = 12, 8, 6, 36


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write(tmp_path: Path, opt: argparse.Namespace, *, legacy: bool = False) -> tuple[Path, Path, scan.ScanModel]:
    model = scan.ScanModel(opt, seed=3)
    checkpoint, vocab = tmp_path / "model_best.pth.tar", tmp_path / "f30k_precomp_vocab.json"
    scan.save_checkpoint(model, checkpoint, legacy=legacy)
    scan.serialize_vocab(WORDS, vocab)
    return checkpoint, vocab, model


def _weights(checkpoint: Path, vocab: Path) -> PublishedWeights:
    return PublishedWeights(
        source=str(checkpoint), sha256=_sha256(checkpoint), layout="scan", vocab={"source": str(vocab)}
    )


def _options(**changes: object) -> argparse.Namespace:
    return scan.options(img_dim=FEATURE_DIM, embed_size=EMBED, word_dim=WORD_DIM, vocab_size=len(WORDS), **changes)


def _convert(checkpoint: Path, vocab_file: Path, block: ScanParams | None = None):  # type: ignore[no-untyped-def]
    vocab = read_published_vocab(vocab_file)
    content = load_torch(checkpoint, NAMESPACE_STAND_IN)
    return convert_checkpoint(
        checkpoint, _weights(checkpoint, vocab_file), content, block or ScanParams(kind="scan"), vocab
    )


@pytest.mark.parametrize(
    ("direction", "aggregation", "bi_gru", "legacy"),
    [("t2i", "Mean", True, False), ("i2t", "LogSumExp", True, True), ("t2i", "LogSumExp", False, False),
     ("i2t", "Mean", False, True)],
)  # fmt: skip
def test_converted_scan_scores_equal_scans_own_code(
    tmp_path: Path, direction: str, aggregation: str, bi_gru: bool, legacy: bool
) -> None:
    opt = _options(cross_attn=direction, agg_func=aggregation, bi_gru=bi_gru, lambda_softmax=4.0, lambda_lse=5.0)
    checkpoint, vocab_file, original = _write(tmp_path, opt, legacy=legacy)
    converted = _convert(checkpoint, vocab_file)
    assert converted.params.direction == direction and converted.params.bidirectional is bi_gru
    assert converted.params.pooling == {"Mean": "avg", "LogSumExp": "lse"}[aggregation]
    assert (converted.params.lambda_softmax, converted.params.lambda_lse, converted.params.embed_dim) == (4.0, 5.0, 8)

    torch.manual_seed(7)
    features = torch.randn(6, REGIONS, FEATURE_DIM)
    token_ids = converted.matcher.tokenizer(CAPTIONS)  # the matcher reads captions through SCAN's vocabulary
    expected = original.scores(features, token_ids)
    matcher = converted.matcher
    with torch.no_grad():
        images = matcher.encode_image(Regions(features, torch.ones(6, REGIONS, dtype=torch.bool)))
        ours = matcher.score(images, matcher.encode_text(pad_captions(token_ids)))
    assert ours.shape == (6, len(CAPTIONS))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_captions_are_tokenised_as_scan_tokenised_them(tmp_path: Path) -> None:
    # nltk word_tokenize of the lower-cased caption keeps punctuation and splits the possessive:
    # "a dog's hat." -> a, dog, 's, hat, . ; "two dogs run." -> two, dogs (unknown), run (unknown), .
    _, vocab_file, _ = _write(tmp_path, _options())
    vocab = read_published_vocab(vocab_file)
    assert vocab.tokenization == "nltk" and vocab.words == WORDS
    assert vocab.encode_text(["A dog's hat.", "Two dogs run.", "A man, in a red hat."]) == [
        [1, 4, 10, 11, 8, 9, 2],
        [1, 14, 3, 3, 9, 2],
        [1, 4, 5, 6, 7, 4, 12, 8, 9, 2],
    ]
    for caption in CAPTIONS:  # the round trip SCAN's data.py makes
        tokens = vocab.tokenize(caption)
        assert vocab.encode_text([caption])[0] == scan.encode_caption(WORDS, tokens)
        assert [w for w in vocab.decode(vocab.encode_text([caption])[0])[1:-1] if w != "<unk>"] == [
            t for t in tokens if t in WORDS
        ]


def test_a_pickled_vocabulary_object_is_read_without_its_class(tmp_path: Path) -> None:
    """CVSE ships `vocab/<data>_precomp_vocab.pkl`: a protocol-2 pickle of `__main__.Vocabulary`."""

    class Vocabulary:  # SCAN vocab.py Vocabulary, pickled under the name a script run as __main__ gives it
        def __init__(self) -> None:
            self.word2idx, self.idx2word, self.idx = {w: i for i, w in enumerate(WORDS)}, dict(enumerate(WORDS)), 15

    Vocabulary.__module__, Vocabulary.__qualname__ = "__main__", "Vocabulary"
    import __main__

    __main__.Vocabulary = Vocabulary  # type: ignore[attr-defined]
    try:
        (tmp_path / "vocab.pkl").write_bytes(pickle.dumps(Vocabulary(), protocol=2))
    finally:
        del __main__.Vocabulary  # type: ignore[attr-defined]
    assert read_published_vocab(tmp_path / "vocab.pkl").words == WORDS


class _Exploit:
    """A pickle that runs a shell command when an ordinary unpickler loads it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    payload = tmp_path / "f30k_precomp_vocab.pkl"
    payload.write_bytes(pickle.dumps({"idx2word": _Exploit(marker)}, protocol=2))
    with pytest.raises(UserError, match=r"refused to load `(posix|os)\.system`"):
        read_published_vocab(payload)
    checkpoint = tmp_path / "model_best.pth.tar"
    torch.save({"model": [{}, {}], "opt": _Exploit(marker)}, checkpoint)
    with pytest.raises(UserError, match=r"not a loadable checkpoint \(refused to load `(posix|os)\.system`\)"):
        load_torch(checkpoint, NAMESPACE_STAND_IN, what="checkpoint")
    legacy = tmp_path / "legacy.pth.tar"  # the pre-1.6 torch format is read by the same guarded unpickler
    torch.save({"model": [{}, {}], "opt": _Exploit(marker)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(UserError, match=r"refused to load `(posix|os)\.system`"):
        load_torch(legacy, NAMESPACE_STAND_IN)
    with pytest.raises(UserError, match=r"refused to load `(posix|os)\.system`"):
        load_pickle(payload)
    assert not marker.exists()


def test_the_options_must_be_ones_the_scan_matcher_builds(tmp_path: Path) -> None:
    checkpoint, vocab_file, _ = _write(tmp_path, _options(raw_feature_norm="softmax"))
    with pytest.raises(UserError, match="trained with raw_feature_norm='softmax'; the scan matcher builds"):
        _convert(checkpoint, vocab_file)
    checkpoint, vocab_file, _ = _write(tmp_path, _options(agg_func="Max"))
    with pytest.raises(UserError, match="agg_func='Max'"):
        _convert(checkpoint, vocab_file)


def test_a_key_the_block_sets_must_agree_with_the_checkpoint(tmp_path: Path) -> None:
    checkpoint, vocab_file, _ = _write(tmp_path, _options(cross_attn="i2t"))
    with pytest.raises(UserError, match=r"direction is 't2i', but the checkpoint .* cross_attn='i2t'"):
        _convert(checkpoint, vocab_file, ScanParams(kind="scan", direction="t2i"))
    assert _convert(checkpoint, vocab_file, ScanParams(kind="scan", margin=0.2)).params.direction == "i2t"


def test_a_vocabulary_of_another_size_is_not_the_checkpoints(tmp_path: Path) -> None:
    checkpoint, vocab_file, _ = _write(tmp_path, _options())
    scan.serialize_vocab(WORDS[:-1], vocab_file)
    with pytest.raises(UserError, match="14 words, but the checkpoint embeds 15: not its vocabulary"):
        _convert(checkpoint, vocab_file)


def test_a_checkpoint_of_another_layout_is_named(tmp_path: Path) -> None:
    checkpoint, vocab_file, _ = _write(tmp_path, _options())
    cvse_like = {"model": [{"fc.weight": torch.zeros(2, 2)}] * 7, "opt": _options(), "epoch": 1}
    torch.save(cvse_like, checkpoint)
    with pytest.raises(UserError, match=r"not a SCAN checkpoint \(layout scan\), whose `model` holds 7 state dicts"):
        _convert(checkpoint, vocab_file)


def test_a_tensor_of_another_shape_is_named(tmp_path: Path) -> None:
    checkpoint, vocab_file, _ = _write(tmp_path, _options())
    content = torch.load(checkpoint, weights_only=False)
    content["model"][1]["rnn.weight_hh_l0"] = torch.zeros(3, 3)
    torch.save(content, checkpoint)
    with pytest.raises(UserError, match=r"mis-shaped: text_encoder\.gru\.weight_hh_l0 \(3, 3\) \(expected \(24, 8\)\)"):
        _convert(checkpoint, vocab_file)
