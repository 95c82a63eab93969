"""A transcription of kuanghuei/SCAN's modules and scoring (`model.py`, `vocab.py`, `train.py`), brought to current
PyTorch (integer division where Python 2 divided ints, explicit softmax dims), and the checkpoint and vocabulary
files SCAN writes: the ground truth that imported SCAN checkpoints are checked against.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


def l2norm(x: Tensor, dim: int, eps: float = 1e-8) -> Tensor:  # SCAN model.py l2norm
    norm = torch.pow(x, 2).sum(dim=dim, keepdim=True).sqrt() + eps
    return torch.div(x, norm)


class EncoderImagePrecomp(nn.Module):  # SCAN model.py
    def __init__(self, img_dim: int, embed_size: int) -> None:
        super().__init__()
        self.fc = nn.Linear(img_dim, embed_size)
        r = np.sqrt(6.0) / np.sqrt(self.fc.in_features + self.fc.out_features)
        self.fc.weight.data.uniform_(-r, r)
        self.fc.bias.data.fill_(0)

    def forward(self, images: Tensor) -> Tensor:
        return l2norm(self.fc(images), dim=-1)


class EncoderText(nn.Module):  # SCAN model.py
    def __init__(self, vocab_size: int, word_dim: int, embed_size: int, num_layers: int, use_bi_gru: bool) -> None:
        super().__init__()
        self.embed_size = embed_size
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.use_bi_gru = use_bi_gru
        self.rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True, bidirectional=use_bi_gru)
        self.embed.weight.data.uniform_(-0.1, 0.1)

    def forward(self, x: Tensor, lengths: Sequence[int]) -> tuple[Tensor, Tensor]:
        x = self.embed(x)
        packed = pack_padded_sequence(x, torch.as_tensor(lengths), batch_first=True)  # lengths sorted descending
        out, _ = self.rnn(packed)
        cap_emb, cap_len = pad_packed_sequence(out, batch_first=True)
        if self.use_bi_gru:
            half = cap_emb.size(2) // 2
            cap_emb = (cap_emb[:, :, :half] + cap_emb[:, :, half:]) / 2
        return l2norm(cap_emb, dim=-1), cap_len


def func_attention(query: Tensor, context: Tensor, smooth: float) -> Tensor:
    """SCAN func_attention with raw_feature_norm = clipped_l2norm; returns the weighted context."""
    batch_size, query_len = query.size(0), query.size(1)
    source_len = context.size(1)
    attn = torch.bmm(context, torch.transpose(query, 1, 2))
    attn = nn.LeakyReLU(0.1)(attn)
    attn = l2norm(attn, 2)
    attn = torch.transpose(attn, 1, 2).contiguous()
    attn = attn.view(batch_size * query_len, source_len)
    attn = nn.Softmax(dim=1)(attn * smooth)
    attn = attn.view(batch_size, query_len, source_len)
    attn_t = torch.transpose(attn, 1, 2).contiguous()
    weighted = torch.bmm(torch.transpose(context, 1, 2), attn_t)
    return torch.transpose(weighted, 1, 2)


def cosine_similarity(x1: Tensor, x2: Tensor, dim: int = 1, eps: float = 1e-8) -> Tensor:  # SCAN model.py
    w12 = torch.sum(x1 * x2, dim)
    w1 = torch.norm(x1, 2, dim)
    w2 = torch.norm(x2, 2, dim)
    return (w12 / (w1 * w2).clamp(min=eps)).squeeze()


def _aggregate(row_sim: Tensor, opt: argparse.Namespace) -> Tensor:
    if opt.agg_func == "LogSumExp":
        row_sim = row_sim.mul(opt.lambda_lse).exp()
        return torch.log(row_sim.sum(dim=1, keepdim=True)) / opt.lambda_lse
    assert opt.agg_func == "Mean"
    return row_sim.mean(dim=1, keepdim=True)


def xattn_scores(images: Tensor, captions: Tensor, cap_lens: Sequence[int], opt: argparse.Namespace) -> Tensor:
    """SCAN xattn_score_t2i / xattn_score_i2t: [n_image, n_caption]."""
    n_image = images.size(0)
    columns = []
    for i in range(captions.size(0)):
        cap_i = captions[i, : cap_lens[i], :].unsqueeze(0).contiguous()
        cap_i_expand = cap_i.repeat(n_image, 1, 1)
        if opt.cross_attn == "t2i":
            context = func_attention(cap_i_expand, images, smooth=opt.lambda_softmax)
            row_sim = cosine_similarity(cap_i_expand, context, dim=2)
        else:
            context = func_attention(images, cap_i_expand, smooth=opt.lambda_softmax)
            row_sim = cosine_similarity(images, context, dim=2)
        columns.append(_aggregate(row_sim.reshape(n_image, -1), opt))
    return torch.cat(columns, 1)


def options(**changes: object) -> argparse.Namespace:
    """SCAN train.py's argparse defaults, with `changes` (the flags of a run)."""
    opt = argparse.Namespace(
        data_path="./data/", data_name="f30k_precomp", vocab_path="./vocab/", margin=0.2, num_epochs=30,
        batch_size=128, word_dim=300, embed_size=1024, grad_clip=2.0, num_layers=1, learning_rate=0.0002,
        lr_update=15, workers=10, log_step=10, val_step=500, logger_name="./runs/runX/log",
        model_name="./runs/runX/checkpoint", resume="", max_violation=False, img_dim=2048, no_imgnorm=False,
        no_txtnorm=False, raw_feature_norm="clipped_l2norm", agg_func="LogSumExp", cross_attn="t2i",
        precomp_enc_type="basic", bi_gru=False, lambda_lse=6.0, lambda_softmax=9.0,
    )  # fmt: skip
    for key, value in changes.items():
        setattr(opt, key, value)
    return opt


class ScanModel:
    """SCAN's two encoders for `opt`, seeded."""

    def __init__(self, opt: argparse.Namespace, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.opt = opt
        self.img_enc = EncoderImagePrecomp(opt.img_dim, opt.embed_size)
        self.txt_enc = EncoderText(opt.vocab_size, opt.word_dim, opt.embed_size, opt.num_layers, opt.bi_gru)

    def state_dict(self) -> list[dict[str, Tensor]]:  # SCAN model.py SCAN.state_dict
        return [self.img_enc.state_dict(), self.txt_enc.state_dict()]

    @torch.no_grad()
    def scores(self, features: Tensor, token_ids: Sequence[Sequence[int]]) -> Tensor:
        """[n_image, n_caption] for precomputed features [n_image, 36, D] and framed token-id lists."""
        order, lengths, padded = length_sorted(token_ids)
        cap_emb, cap_len = self.txt_enc(padded, lengths)
        sorted_scores = xattn_scores(self.img_enc(features), cap_emb, cap_len.tolist(), self.opt)
        scores = torch.empty_like(sorted_scores)
        scores[:, order] = sorted_scores
        return scores


def length_sorted(token_ids: Sequence[Sequence[int]]) -> tuple[list[int], list[int], Tensor]:
    """SCAN's (and CVSE's) `collate_fn`: the captions longest first, zero-padded [n, L_max]; returns the order they
    were taken in, their lengths and the padded ids."""
    order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
    lengths = [len(token_ids[i]) for i in order]
    padded = torch.zeros(len(order), max(lengths), dtype=torch.long)
    for row, i in enumerate(order):
        padded[row, : lengths[row]] = torch.tensor(token_ids[i])
    return order, lengths, padded


def save_checkpoint(model: ScanModel, path: Path, *, legacy: bool = False) -> None:
    """SCAN train.py save_checkpoint's dict; `legacy`: the pre-1.6 file format SCAN's PyTorch 0.3/0.4 wrote."""
    save_training_state(model.state_dict(), model.opt, path, epoch=17, best_rsum=446.2, legacy=legacy)


def save_training_state(
    state_dict: object, opt: argparse.Namespace, path: Path, *, epoch: int, best_rsum: float, legacy: bool
) -> None:
    """The dict SCAN's and CVSE's `save_checkpoint` write (best_rsum a numpy float, as their numpy recalls sum)."""
    state = {"epoch": epoch, "model": state_dict, "best_rsum": np.float64(best_rsum), "opt": opt, "Eiters": 5}
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)


def serialize_vocab(words: Sequence[str], path: Path) -> None:
    """SCAN vocab.py serialize_vocab of a Vocabulary holding `words` in id order."""
    document = {"word2idx": {w: i for i, w in enumerate(words)}, "idx2word": dict(enumerate(words)), "idx": len(words)}
    path.write_text(json.dumps(document))


def encode_caption(words: Sequence[str], tokens: Sequence[str]) -> list[int]:
    """SCAN data.py PrecompDataset.__getitem__: <start>, vocab(token) (unknown as <unk>), <end>."""
    ids = {word: i for i, word in enumerate(words)}
    return [ids["<start>"], *(ids.get(token, ids["<unk>"]) for token in tokens), ids["<end>"]]
