"""VSE∞ checkpoints, written as woodfrog/vse_infty (branch bigru) writes them (tests/vse_infty_original.py),
converted into our `vse_infty` matcher: the scores equal VSE∞'s own code on the same inputs, the converted model
saves and loads like any other, and what our matcher does not build is refused with one line."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from itm.config import PublishedWeights, ScanParams, VseInftyParams
from itm.data.batches import Regions
from itm.data.loaders import pad_captions
from itm.errors import UserError
from itm.models import load_matcher, save_matcher
from itm.safe_load import NAMESPACE_STAND_IN, load_torch
from itm.train.published import Converted, convert_checkpoint
from itm.train.published.vocabulary import read_published_vocab
from tests import scan_original, vse_infty_original
from tests.test_published_scan import CAPTIONS, WORDS, _sha256

FEATURE_DIM, EMBED, WORD_DIM = 12, 8, 6
REGION_COUNTS = [36, 36, 20, 36, 7, 36]


def _options(**changes: object) -> argparse.Namespace:
    return vse_infty_original.options(
        img_dim=FEATURE_DIM, embed_size=EMBED, word_dim=WORD_DIM, vocab_size=len(WORDS) + 1, **changes
    )


def _write(
    tmp_path: Path, opt: argparse.Namespace, *, data_parallel: bool = False
) -> tuple[Path, Path, vse_infty_original.VseInftyModel]:
    """model_best.pth and SCAN's vocabulary JSON (which VSE∞ reads, `lib/vocab.py` `deserialize_vocab`)."""
    model = vse_infty_original.VseInftyModel(opt, seed=3)
    checkpoint, vocab = tmp_path / "model_best.pth", tmp_path / "f30k_precomp_vocab.json"
    vse_infty_original.save_checkpoint(model, checkpoint)
    if data_parallel:  # nn.DataParallel(img_enc / txt_enc).state_dict(): every key under `module.`
        content = torch.load(checkpoint, weights_only=False)
        content["model"] = [{f"module.{key}": value for key, value in state.items()} for state in content["model"]]
        torch.save(content, checkpoint)
    scan_original.serialize_vocab(WORDS, vocab)
    return checkpoint, vocab, model


def _weights(checkpoint: Path, vocab: Path, layout: str = "vse_infty") -> PublishedWeights:
    return PublishedWeights(
        source=str(checkpoint), sha256=_sha256(checkpoint), layout=layout, vocab={"source": str(vocab)}
    )


def _convert(checkpoint: Path, vocab_file: Path, block: VseInftyParams | None = None) -> Converted:
    vocab = read_published_vocab(vocab_file)
    content = load_torch(checkpoint, NAMESPACE_STAND_IN)
    return convert_checkpoint(
        checkpoint, _weights(checkpoint, vocab_file), content, block or VseInftyParams(kind="vse_infty"), vocab
    )


def _one_line_error(checkpoint: Path, vocab_file: Path, match: str, block: VseInftyParams | None = None) -> None:
    with pytest.raises(UserError, match=match) as raised:
        _convert(checkpoint, vocab_file, block)
    assert "\n" not in str(raised.value)


def _regions(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, FEATURE_DIM, generator=generator) * 2 for n in REGION_COUNTS]


def _our_scores(converted: Converted, images: list[torch.Tensor], token_ids: list[list[int]]) -> torch.Tensor:
    features, lengths = vse_infty_original.collate_regions(images)
    regions = Regions(features, torch.arange(features.shape[1])[None] < lengths[:, None])
    matcher = converted.matcher
    with torch.no_grad():
        return matcher.score(matcher.encode_image(regions), matcher.encode_text(pad_captions(token_ids)))


@pytest.mark.parametrize("data_parallel", [False, True])
def test_converted_vse_infty_scores_equal_vse_inftys_own_code(tmp_path: Path, data_parallel: bool) -> None:
    checkpoint, vocab_file, original = _write(tmp_path, _options(), data_parallel=data_parallel)
    converted = _convert(checkpoint, vocab_file)
    params = converted.params
    assert isinstance(params, VseInftyParams)
    assert (params.embed_dim, params.word_dim, params.gpo_pe_dim, params.gpo_hidden_dim) == (EMBED, WORD_DIM, 32, 32)
    assert params.bidirectional and params.max_violation and params.margin == 0.2
    assert converted.feature_dim == FEATURE_DIM and converted.options["vse_mean_warmup_epochs"] == 1
    assert not converted.matcher.training

    images = _regions(seed=7)
    token_ids = converted.matcher.tokenizer(CAPTIONS)  # the matcher reads captions through VSE∞'s vocabulary
    assert token_ids[0] == [1, 4, 5, 6, 7, 4, 12, 8, 9, 2]  # nltk words, punctuation kept, as VSE∞ tokenises
    expected = original.scores(images, token_ids)
    ours = _our_scores(converted, images, token_ids)
    assert ours.shape == (len(images), len(CAPTIONS))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_a_converted_model_saves_and_loads_with_its_mask_row(tmp_path: Path) -> None:
    """The embedding keeps VSE∞'s <mask> row beyond the vocabulary's words, also when rebuilt from disk."""
    checkpoint, vocab_file, original = _write(tmp_path, _options())
    converted = _convert(checkpoint, vocab_file)
    vocab = read_published_vocab(vocab_file)
    assert converted.matcher.text_encoder.embed.num_embeddings == len(vocab) + 1 == len(WORDS) + 1
    card = {"params": converted.params.model_dump(mode="json"), "feature_dim": FEATURE_DIM,
            "vocab_size": len(vocab), "vocab_digest": vocab.digest()}  # fmt: skip
    state = {key: value.cpu() for key, value in converted.matcher.state_dict().items()}
    save_matcher(tmp_path / "model", state, card, vocab=vocab)
    loaded, _ = load_matcher(tmp_path / "model", torch.device("cpu"))
    images = _regions(seed=8)
    token_ids = loaded.tokenizer(CAPTIONS)
    reloaded = Converted(loaded, converted.params, converted.options, FEATURE_DIM)
    torch.testing.assert_close(_our_scores(reloaded, images, token_ids), original.scores(images, token_ids),
                               atol=1e-5, rtol=0)  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"precomp_enc_type": "backbone"}, "trained with precomp_enc_type='backbone'; the vse_infty matcher builds"),
     ({"no_txtnorm": True}, "trained with no_txtnorm=True; the vse_infty matcher builds False"),
     ({"no_imgnorm": True}, "trained with no_imgnorm=True; the vse_infty matcher builds False"),
     ({"num_layers": 2}, "trained with num_layers=2; the vse_infty matcher builds 1")],
)  # fmt: skip
def test_options_the_matcher_does_not_build_are_refused(tmp_path: Path, changes: dict, message: str) -> None:
    checkpoint, vocab_file, _ = _write(tmp_path, _options())
    content = torch.load(checkpoint, weights_only=False)
    content["opt"] = _options(**changes)
    if "precomp_enc_type" in changes:  # EncoderImageFull under nn.DataParallel: a CNN, then EncoderImageAggr
        image = {f"module.image_encoder.{key}": value for key, value in content["model"][0].items()}
        content["model"][0] = {"module.backbone.base.0.weight": torch.zeros(4, 3, 7, 7)} | image
    torch.save(content, checkpoint)
    _one_line_error(checkpoint, vocab_file, message)


def test_a_bert_text_encoder_is_refused(tmp_path: Path) -> None:
    """The master branch's models: BERT-base and a linear layer before the GPO."""
    checkpoint, vocab_file, _ = _write(tmp_path, _options())
    content = torch.load(checkpoint, weights_only=False)
    gpo = {key: value for key, value in content["model"][1].items() if key.startswith("gpool.")}
    bert = {"bert.embeddings.word_embeddings.weight": torch.zeros(30, 4), "linear.weight": torch.zeros(EMBED, 4)}
    content["model"][1] = {f"module.{key}": value for key, value in (bert | gpo).items()}
    torch.save(content, checkpoint)
    _one_line_error(checkpoint, vocab_file, r"its text encoder is BERT \(VSE∞'s master branch\)")


def test_a_key_the_block_sets_must_agree_with_the_checkpoint(tmp_path: Path) -> None:
    checkpoint, vocab_file, _ = _write(tmp_path, _options())
    _one_line_error(checkpoint, vocab_file, r"embed_dim is 1024, but the checkpoint model_best.pth was trained with "
                    r"embed_dim=8 \(embed_size\)", VseInftyParams(kind="vse_infty", embed_dim=1024))  # fmt: skip
    _one_line_error(checkpoint, vocab_file, r"gpo_hidden_dim is 16, .* gpo_hidden_dim=32 \(its tensors\)",
                    VseInftyParams(kind="vse_infty", gpo_hidden_dim=16))  # fmt: skip
    block = VseInftyParams(kind="vse_infty", margin=0.2, region_drop=0.1)  # agreeing, and a training-only key
    assert _convert(checkpoint, vocab_file, block).params.region_drop == 0.1


def test_a_vocabulary_of_another_size_is_not_the_checkpoints(tmp_path: Path) -> None:
    checkpoint, vocab_file, _ = _write(tmp_path, _options())
    scan_original.serialize_vocab(WORDS[:-1], vocab_file)
    _one_line_error(checkpoint, vocab_file, r"14 words \(\+ 1 appended\), but the checkpoint embeds 16: not its vocab")
    scan_original.serialize_vocab((*WORDS, "<mask>"), vocab_file)
    _one_line_error(checkpoint, vocab_file, "holds <mask> at id 15; VSE∞ appends it itself")


def test_a_checkpoint_of_another_layout_is_named(tmp_path: Path) -> None:
    checkpoint, vocab_file, _ = _write(tmp_path, _options())
    scan_like = {"model": [{"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}, {}], "opt": _options()}
    torch.save(scan_like, checkpoint)
    _one_line_error(checkpoint, vocab_file, r"not a VSE∞ checkpoint \(layout vse_infty\), whose `model` holds 2 state")
    _write(tmp_path, _options())
    content = load_torch(checkpoint, NAMESPACE_STAND_IN)
    vocab = read_published_vocab(vocab_file)
    with pytest.raises(UserError, match=r"not a SCAN checkpoint \(layout scan\)"):
        convert_checkpoint(
            checkpoint, _weights(checkpoint, vocab_file, "scan"), content, ScanParams(kind="scan"), vocab
        )


def test_tensors_of_another_shape_or_name_are_named(tmp_path: Path) -> None:
    checkpoint, vocab_file, _ = _write(tmp_path, _options())
    content = torch.load(checkpoint, weights_only=False)
    content["model"][0]["mlp.layers.1.weight"] = torch.zeros(3, 3)
    torch.save(content, checkpoint)
    _one_line_error(checkpoint, vocab_file,
                    r"mis-shaped: image_encoder\.mlp\.layers\.1\.weight \(3, 3\) \(expected \(8, 4\)\)")  # fmt: skip
    content["model"][0].pop("mlp.layers.1.weight")
    content["model"][0]["mlp.extra.weight"] = torch.zeros(2)
    torch.save(content, checkpoint)
    _one_line_error(checkpoint, vocab_file, r"missing: image_encoder\.mlp\.layers\.1\.weight; unexpected: "
                    r"image_encoder\.mlp\.extra\.weight")  # fmt: skip
    _write(tmp_path, _options())
    content = torch.load(checkpoint, weights_only=False)
    content["model"][1]["rnn.weight_ih_l1"] = torch.zeros(3, 3)
    torch.save(content, checkpoint)
    _one_line_error(
        checkpoint, vocab_file, "the text encoder has tensors VSE∞'s EncoderText does not: rnn.weight_ih_l1"
    )
