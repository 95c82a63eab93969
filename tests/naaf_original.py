"""A transcription of CrossmodalGroup/NAAF's `model.py` (commit cafcd6f): the encoders, the training similarity with
its threshold updates (`xattn_score`), the retrieval similarity (`xattn_score_test`) and the hinge loss, brought to
current PyTorch on the CPU (no `.cuda()`, no `Variable`); otherwise line for line, including the options object
`opt` whose `thres` / `thres_safe` the training similarity rewrites (variables NAAF sets but never reads are left
out). The ground truth for tests/test_naaf.py.
"""

# ruff: noqa: N803, N806  (NAAF's own names)

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


def options(**overrides: float) -> argparse.Namespace:
    """The `opt` fields `xattn_score` reads and writes, with `train.py`'s defaults."""
    defaults = {"lambda_softmax": 20.0, "thres": 0.0, "thres_safe": 0.0, "alpha": 2.0, "mean_pos": 0.0,
                "mean_neg": 0.0, "stnd_pos": 0.0, "stnd_neg": 0.0, "using_intra_info": False}  # fmt: skip
    return argparse.Namespace(**(defaults | overrides))


def l1norm(X: Tensor, dim: int, eps: float = 1e-8) -> Tensor:
    norm = torch.abs(X).sum(dim=dim, keepdim=True) + eps
    X = torch.div(X, norm)
    return X


def l2norm(X: Tensor, dim: int, eps: float = 1e-8) -> Tensor:
    norm = torch.pow(X, 2).sum(dim=dim, keepdim=True).sqrt() + eps
    X = torch.div(X, norm)
    return X


class EncoderImagePrecomp(nn.Module):
    def __init__(self, img_dim: int, embed_size: int, no_imgnorm: bool = False) -> None:
        super().__init__()
        self.embed_size = embed_size
        self.no_imgnorm = no_imgnorm
        self.fc = nn.Linear(img_dim, embed_size)
        r = np.sqrt(6.0) / np.sqrt(self.fc.in_features + self.fc.out_features)
        self.fc.weight.data.uniform_(-r, r)
        self.fc.bias.data.fill_(0)

    def forward(self, images: Tensor) -> Tensor:
        features = self.fc(images)
        if not self.no_imgnorm:
            features = l2norm(features, dim=-1)
        return features


class EncoderText(nn.Module):
    def __init__(self, vocab_size: int, word_dim: int, embed_size: int, num_layers: int, no_txtnorm: bool = False):
        super().__init__()
        self.embed_size = embed_size
        self.no_txtnorm = no_txtnorm
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True, bidirectional=True)
        self.embed.weight.data.uniform_(-0.1, 0.1)

    def forward(self, x: Tensor, lengths: Sequence[int]) -> tuple[Tensor, Tensor]:
        x = self.embed(x)
        packed = pack_padded_sequence(x, torch.as_tensor(lengths), batch_first=True)
        out, _ = self.rnn(packed)
        padded = pad_packed_sequence(out, batch_first=True)
        cap_emb, cap_len = padded
        cap_emb = (cap_emb[:, :, : cap_emb.size(2) // 2] + cap_emb[:, :, cap_emb.size(2) // 2 :]) / 2
        if not self.no_txtnorm:
            cap_emb = l2norm(cap_emb, dim=-1)
        return cap_emb, cap_len


def get_mask_attention(attn: Tensor, batch_size: int, sourceL: int, queryL: int, lamda: float = 1) -> Tensor:
    mask_positive = attn.le(0)
    attn_pos = attn.masked_fill(mask_positive, torch.tensor(-1e9))
    attn_pos = torch.exp(attn_pos * lamda)
    attn_pos = l1norm(attn_pos, 1)
    attn_pos = attn_pos.view(batch_size, queryL, sourceL)
    return attn_pos


def cosine_similarity(x1: Tensor, x2: Tensor, dim: int = 1, eps: float = 1e-8) -> Tensor:
    w12 = torch.sum(x1 * x2, dim)
    w2 = torch.norm(x2, 2, dim)
    return (w12 / (w2).clamp(min=eps)).squeeze()


def intra_relation(K: Tensor, Q: Tensor, xlambda: float) -> Tensor:
    batch_size, KL = K.size(0), K.size(1)
    K = torch.transpose(K, 1, 2).contiguous()
    attn = torch.bmm(Q, K)
    attn = attn.view(batch_size * KL, KL)
    attn = nn.Softmax(dim=1)(attn * xlambda)
    attn = attn.view(batch_size, KL, KL)
    return attn


def inter_relations(attn: Tensor, batch_size: int, sourceL: int, queryL: int, xlambda: float) -> Tensor:
    attn = nn.LeakyReLU(0.1)(attn)
    attn = l2norm(attn, 2)
    attn = torch.transpose(attn, 1, 2).contiguous()
    attn = attn.view(batch_size * queryL, sourceL)
    attn = nn.Softmax(dim=1)(attn * xlambda)
    attn = attn.view(batch_size, queryL, sourceL)
    return attn


def xattn_score(images: Tensor, captions: Tensor, cap_lens: Sequence[int], opt: argparse.Namespace) -> Tensor:
    """NAAF's training similarity; rewrites opt.thres and opt.thres_safe as it goes."""
    similarities = []
    max_pos = []
    max_neg = []
    n_image = images.size(0)
    n_caption = captions.size(0)
    n_region = images.size(1)
    batch_size = n_image
    N_POS_WORD = 0

    for i in range(n_caption):
        n_word = int(cap_lens[i])
        cap_i = captions[i, :n_word, :].unsqueeze(0).contiguous()
        cap_i_expand = cap_i.repeat(n_image, 1, 1)
        contextT = torch.transpose(images, 1, 2)

        attn = torch.bmm(cap_i_expand, contextT)
        attn_i = torch.transpose(attn, 1, 2).contiguous()
        attn_thres = attn - torch.ones_like(attn) * opt.thres

        # Neg-Pos Branch Matching
        batch_size, queryL, sourceL = images.size(0), cap_i_expand.size(1), images.size(1)
        attn_row = attn_thres.view(batch_size * queryL, sourceL)
        Row_max = torch.max(attn_row, 1)[0].unsqueeze(-1)
        attn_neg = Row_max.lt(0).float()
        t2i_sim_neg = Row_max * attn_neg
        t2i_sim_neg = t2i_sim_neg.view(batch_size, queryL)

        attn_pos = get_mask_attention(attn_row, batch_size, sourceL, queryL, opt.lambda_softmax)
        weiContext_pos = torch.bmm(attn_pos, images)
        t2i_sim_pos_f = cosine_similarity(cap_i_expand, weiContext_pos, dim=2)

        attn_weight = inter_relations(attn_i, batch_size, n_region, n_word, opt.lambda_softmax)
        t2i_sim_pos_r = attn.mul(attn_weight).sum(-1)

        t2i_sim_pos = t2i_sim_pos_f + t2i_sim_pos_r

        t2i_sim = t2i_sim_neg + t2i_sim_pos
        sim = t2i_sim.mean(dim=1, keepdim=True)

        # Discriminative Mismatch Mining
        wrong_index = sim.sort(0, descending=True)[1][0].item()
        if wrong_index == i:
            attn_max_row = torch.max(attn.reshape(batch_size * n_word, n_region).squeeze(), 1)[0]
            attn_max_row_pos = attn_max_row[(i * n_word) : (i * n_word + n_word)]

            neg_index = sim.sort(0)[1][0].item()
            attn_max_row_neg = attn_max_row[(neg_index * n_word) : (neg_index * n_word + n_word)]

            max_pos.append(attn_max_row_pos)
            max_neg.append(attn_max_row_neg)
            N_POS_WORD = N_POS_WORD + n_word
            if N_POS_WORD > 200:
                max_pos_aggre = torch.cat(max_pos, 0)
                max_neg_aggre = torch.cat(max_neg, 0)
                mean_pos = max_pos_aggre.mean()
                mean_neg = max_neg_aggre.mean()
                stnd_pos = max_pos_aggre.std()
                stnd_neg = max_neg_aggre.std()

                A = stnd_pos.pow(2) - stnd_neg.pow(2)
                B = 2 * ((mean_pos * stnd_neg.pow(2)) - (mean_neg * stnd_pos.pow(2)))
                C = (
                    (mean_neg * stnd_pos).pow(2)
                    - (mean_pos * stnd_neg).pow(2)
                    + 2 * (stnd_pos * stnd_neg).pow(2) * torch.log(stnd_neg / (opt.alpha * stnd_pos) + 1e-8)
                )

                thres = opt.thres
                thres_safe = opt.thres_safe
                opt.stnd_pos = stnd_pos.item()
                opt.stnd_neg = stnd_neg.item()
                opt.mean_pos = mean_pos.item()
                opt.mean_neg = mean_neg.item()

                E = B.pow(2) - 4 * A * C
                if E > 0:
                    opt.thres = ((-B + torch.sqrt(E)) / (2 * A + 1e-10)).item()
                    opt.thres_safe = (mean_pos - 3 * opt.stnd_pos).item()

                if opt.thres < 0:
                    opt.thres = 0
                if opt.thres > 1:
                    opt.thres = 0

                if opt.thres_safe < 0:
                    opt.thres_safe = 0
                if opt.thres_safe > 1:
                    opt.thres_safe = 0

                opt.thres = 0.7 * opt.thres + 0.3 * thres
                opt.thres_safe = 0.7 * opt.thres_safe + 0.3 * thres_safe

        if N_POS_WORD < 200:
            opt.thres = 0
            opt.thres_safe = 0

        similarities.append(sim)

    similarities = torch.cat(similarities, 1)
    return similarities


class ContrastiveLoss(nn.Module):
    def __init__(self, opt: argparse.Namespace, margin: float = 0, max_violation: bool = True) -> None:
        super().__init__()
        self.opt = opt
        self.margin = margin
        self.max_violation = max_violation

    def forward(self, scores: Tensor, length: int) -> Tensor:
        diagonal = scores.diag().view(length, 1)
        d1 = diagonal.expand_as(scores)
        d2 = diagonal.t().expand_as(scores)
        cost_s = (self.margin + scores - d1).clamp(min=0)
        cost_im = (self.margin + scores - d2).clamp(min=0)
        mask = torch.eye(scores.size(0)) > 0.5
        cost_s = cost_s.masked_fill_(mask, 0)
        cost_im = cost_im.masked_fill_(mask, 0)
        if self.max_violation:
            cost_s = cost_s.max(1)[0]
            cost_im = cost_im.max(0)[0]
        return cost_s.sum() + cost_im.sum()


def xattn_score_test(images: Tensor, captions: Tensor, cap_lens: Sequence[int], opt: argparse.Namespace) -> Tensor:
    """NAAF's retrieval similarity (the safe threshold, the negative indicator smoothed across words)."""
    similarities = []
    n_image = images.size(0)
    n_caption = captions.size(0)
    n_region = images.size(1)
    batch_size = n_image

    opt.using_intra_info = True

    for i in range(n_caption):
        n_word = int(cap_lens[i])
        cap_i = captions[i, :n_word, :].unsqueeze(0).contiguous()
        cap_i_expand = cap_i.repeat(n_image, 1, 1)
        contextT = torch.transpose(images, 1, 2)

        attn = torch.bmm(cap_i_expand, contextT)
        attn_i = torch.transpose(attn, 1, 2).contiguous()
        attn_thres = attn - torch.ones_like(attn) * opt.thres_safe

        batch_size, queryL, sourceL = images.size(0), cap_i_expand.size(1), images.size(1)
        attn_row = attn_thres.view(batch_size * queryL, sourceL)
        Row_max = torch.max(attn_row, 1)[0].unsqueeze(-1)
        if opt.using_intra_info:
            attn_intra = intra_relation(cap_i, cap_i, 5)
            attn_intra = attn_intra.repeat(batch_size, 1, 1)
            Row_max_intra = torch.bmm(attn_intra, Row_max.reshape(batch_size, n_word).unsqueeze(-1)).reshape(
                batch_size * n_word, 1
            )
            attn_neg = Row_max_intra.lt(0).double()
            t2i_sim_neg = Row_max * attn_neg
        else:
            attn_neg = Row_max.lt(0).float()
            t2i_sim_neg = Row_max * attn_neg

        t2i_sim_neg = t2i_sim_neg.view(batch_size, queryL)

        attn_pos = get_mask_attention(attn_row, batch_size, sourceL, queryL, opt.lambda_softmax)
        weiContext_pos = torch.bmm(attn_pos, images)
        t2i_sim_pos_f = cosine_similarity(cap_i_expand, weiContext_pos, dim=2)

        attn_weight = inter_relations(attn_i, batch_size, n_region, n_word, opt.lambda_softmax)
        t2i_sim_pos_r = attn.mul(attn_weight).sum(-1)

        t2i_sim_pos = t2i_sim_pos_f + t2i_sim_pos_r

        t2i_sim = t2i_sim_neg + t2i_sim_pos
        sim = t2i_sim.mean(dim=1, keepdim=True)

        similarities.append(sim)

    similarities = torch.cat(similarities, 1)
    return similarities
