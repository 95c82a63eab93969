"""A transcription of woodfrog/vse_infty, branch `bigru` (BUTD regions + bi-GRU): its encoders (`lib/encoders.py`
`l2norm`, `EncoderImageAggr` with precomp_enc_type 'basic', `EncoderText`), the pooling (`lib/modules/aggr/gpo.py`
`positional_encoding_1d`, `GPO`), the MLP (`lib/modules/mlp.py`), the loss (`lib/loss.py`), the training-time
augmentations of its loader (`lib/datasets/image_caption.py` `PrecompRegionDataset.__getitem__`, `process_caption`,
`collate_fn`), its vocabulary (`lib/vocab.py`, with `train.py`'s `vocab.add_word('<mask>')`) and the checkpoint
`train.py` `save_checkpoint` writes: the ground truth that our `vse_infty` matcher and converted checkpoints are
checked against.

Changes, none of which alter a number: no `.cuda()` calls; the loader's randomness (`np.random.rand`,
`random.random`, `random.randrange`) is passed in as values so a test can give ours the same draws; a caption is
passed already split (`nltk.tokenize.word_tokenize(caption.lower())`).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from tests.scan_original import length_sorted, save_training_state


def l2norm(X: Tensor, dim: int, eps: float = 1e-8) -> Tensor:  # noqa: N803  (lib/encoders.py)
    norm = torch.pow(X, 2).sum(dim=dim, keepdim=True).sqrt() + eps
    X = torch.div(X, norm)  # noqa: N806
    return X


def positional_encoding_1d(d_model: int, length: int) -> Tensor:  # lib/modules/aggr/gpo.py
    if d_model % 2 != 0:
        raise ValueError(f"Cannot use sin/cos positional encoding with odd dim (got dim={d_model:d})")
    pe = torch.zeros(length, d_model)
    position = torch.arange(0, length).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float) * -(math.log(10000.0) / d_model))
    pe[:, 0::2] = torch.sin(position.float() * div_term)
    pe[:, 1::2] = torch.cos(position.float() * div_term)
    return pe


class GPO(nn.Module):  # lib/modules/aggr/gpo.py
    def __init__(self, d_pe: int, d_hidden: int) -> None:
        super().__init__()
        self.d_pe = d_pe
        self.d_hidden = d_hidden
        self.pe_database: dict[int, Tensor] = {}
        self.gru = nn.GRU(self.d_pe, d_hidden, 1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(self.d_hidden, 1, bias=False)

    def compute_pool_weights(self, lengths: Tensor, features: Tensor) -> tuple[Tensor, Tensor]:
        max_len = int(lengths.max())
        pe_max_len = self.get_pe(max_len)
        pes = pe_max_len.unsqueeze(0).repeat(lengths.size(0), 1, 1).to(lengths.device)
        mask = torch.arange(max_len).expand(lengths.size(0), max_len).to(lengths.device)
        mask = (mask < lengths.long().unsqueeze(1)).unsqueeze(-1)
        pes = pes.masked_fill(mask == 0, 0)

        self.gru.flatten_parameters()
        packed = pack_padded_sequence(pes, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        padded = pad_packed_sequence(out, batch_first=True)
        out_emb, _out_len = padded
        out_emb = (out_emb[:, :, : out_emb.size(2) // 2] + out_emb[:, :, out_emb.size(2) // 2 :]) / 2
        scores = self.linear(out_emb)
        scores[torch.where(mask == 0)] = -10000

        weights = torch.softmax(scores / 0.1, 1)
        return weights, mask

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        pool_weights, mask = self.compute_pool_weights(lengths, features)

        features = features[:, : int(lengths.max()), :]
        sorted_features = features.masked_fill(mask == 0, -10000)
        sorted_features = sorted_features.sort(dim=1, descending=True)[0]
        sorted_features = sorted_features.masked_fill(mask == 0, 0)

        pooled_features = (sorted_features * pool_weights).sum(1)
        return pooled_features, pool_weights

    def get_pe(self, length: int) -> Tensor:
        length = int(length)
        if length in self.pe_database:
            return self.pe_database[length]
        pe = positional_encoding_1d(self.d_pe, length)
        self.pe_database[length] = pe
        return pe


class MLP(nn.Module):  # lib/modules/mlp.py
    """Very simple multi-layer perceptron (also called FFN)"""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        self.output_dim = output_dim
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim, *h], [*h, output_dim], strict=True))
        self.bns = nn.ModuleList(nn.BatchNorm1d(k) for k in [*h, output_dim])

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.size()  # noqa: N806  (their names)
        x = x.reshape(B * N, D)
        for i, (bn, layer) in enumerate(zip(self.bns, self.layers, strict=True)):
            x = F.relu(bn(layer(x))) if i < self.num_layers - 1 else layer(x)
        x = x.view(B, N, self.output_dim)
        return x


class EncoderImageAggr(nn.Module):  # lib/encoders.py
    def __init__(self, img_dim: int, embed_size: int, precomp_enc_type: str = "basic", no_imgnorm: bool = False):
        super().__init__()
        self.embed_size = embed_size
        self.no_imgnorm = no_imgnorm
        self.fc = nn.Linear(img_dim, embed_size)
        self.precomp_enc_type = precomp_enc_type
        if precomp_enc_type == "basic":
            self.mlp = MLP(img_dim, embed_size // 2, embed_size, 2)
        self.gpool = GPO(32, 32)
        self.init_weights()

    def init_weights(self) -> None:
        r = np.sqrt(6.0) / np.sqrt(self.fc.in_features + self.fc.out_features)
        self.fc.weight.data.uniform_(-r, r)
        self.fc.bias.data.fill_(0)

    def forward(self, images: Tensor, image_lengths: Tensor) -> Tensor:
        features = self.fc(images)
        if self.precomp_enc_type == "basic":
            features = self.mlp(images) + features
        features, _pool_weights = self.gpool(features, image_lengths)
        if not self.no_imgnorm:
            features = l2norm(features, dim=-1)
        return features


class EncoderText(nn.Module):  # lib/encoders.py, branch bigru
    def __init__(
        self, vocab_size: int, embed_size: int, word_dim: int, num_layers: int, use_bi_gru: bool = True,
        no_txtnorm: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.embed_size = embed_size
        self.no_txtnorm = no_txtnorm
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.gpool = GPO(32, 32)
        self.rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True, bidirectional=use_bi_gru)
        self.init_weights()

    def init_weights(self) -> None:
        self.embed.weight.data.uniform_(-0.1, 0.1)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        x_emb = self.embed(x)
        self.rnn.flatten_parameters()
        packed = pack_padded_sequence(x_emb, lengths.cpu(), batch_first=True)  # lengths sorted, longest first
        out, _ = self.rnn(packed)
        padded = pad_packed_sequence(out, batch_first=True)
        cap_emb, cap_len = padded
        cap_emb = (cap_emb[:, :, : cap_emb.size(2) // 2] + cap_emb[:, :, cap_emb.size(2) // 2 :]) / 2
        pooled_features, _pool_weights = self.gpool(cap_emb, cap_len.to(cap_emb.device))
        if not self.no_txtnorm:
            pooled_features = l2norm(pooled_features, dim=-1)
        return pooled_features


class ContrastiveLoss(nn.Module):  # lib/loss.py
    def __init__(self, opt: argparse.Namespace, margin: float = 0, max_violation: bool = False) -> None:
        super().__init__()
        self.opt = opt
        self.margin = margin
        self.max_violation = max_violation

    def max_violation_on(self) -> None:
        self.max_violation = True

    def max_violation_off(self) -> None:
        self.max_violation = False

    def forward(self, im: Tensor, s: Tensor) -> Tensor:
        scores = get_sim(im, s)
        diagonal = scores.diag().view(im.size(0), 1)
        d1 = diagonal.expand_as(scores)
        d2 = diagonal.t().expand_as(scores)
        cost_s = (self.margin + scores - d1).clamp(min=0)  # caption retrieval
        cost_im = (self.margin + scores - d2).clamp(min=0)  # image retrieval
        mask = torch.eye(scores.size(0)) > 0.5
        cost_s = cost_s.masked_fill_(mask, 0)
        cost_im = cost_im.masked_fill_(mask, 0)
        if self.max_violation:
            cost_s = cost_s.max(1)[0]
            cost_im = cost_im.max(0)[0]
        return cost_s.sum() + cost_im.sum()


def get_sim(images: Tensor, captions: Tensor) -> Tensor:  # lib/loss.py
    similarities = images.mm(captions.t())
    return similarities


# --- the loader's training-time augmentations (lib/datasets/image_caption.py) --------------------------------------


def drop_regions(image: np.ndarray, rand_list: np.ndarray) -> Tensor:
    """PrecompRegionDataset.__getitem__ in training, `rand_list = np.random.rand(num_features)` given."""
    image = image[np.where(rand_list > 0.20)]
    return torch.Tensor(image)


class Vocabulary:  # lib/vocab.py
    def __init__(self) -> None:
        self.word2idx: dict[str, int] = {}
        self.idx2word: dict[int, str] = {}
        self.idx = 0

    def add_word(self, word: str) -> None:
        if word not in self.word2idx:
            self.word2idx[word] = self.idx
            self.idx2word[self.idx] = word
            self.idx += 1

    def __call__(self, word: str) -> int:
        if word not in self.word2idx:
            return self.word2idx["<unk>"]
        return self.word2idx[word]

    def __len__(self) -> int:
        return len(self.word2idx)


def vocabulary(words: Sequence[str]) -> Vocabulary:
    """`deserialize_vocab` of a file holding `words` in id order, then train.py's `vocab.add_word('<mask>')`."""
    vocab = Vocabulary()
    for word in words:
        vocab.add_word(word)
    vocab.add_word("<mask>")
    return vocab


class Draws:
    """Stands in for the `random` module over one caption: the k-th `random()` returns `uniforms[k]`, and
    `randrange(n)` the id given for the token of the last `random()` call (one draw and one id per token)."""

    def __init__(self, uniforms: Sequence[float], ids: Sequence[int]) -> None:
        self.uniforms, self.ids, self.position = list(uniforms), list(ids), 0

    def random(self) -> float:
        self.position += 1
        return self.uniforms[self.position - 1]

    def randrange(self, n: int) -> int:
        value = self.ids[self.position - 1]
        assert 0 <= value < n
        return value


def process_caption(vocab: Vocabulary, tokens: Sequence[str], drop: bool, random: Draws | None = None) -> Tensor:
    """image_caption.py process_caption, `tokens` = nltk.tokenize.word_tokenize(caption.lower())."""
    if not drop:
        caption = [vocab("<start>")]
        caption.extend([vocab(token) for token in tokens])
        caption.append(vocab("<end>"))
        return torch.Tensor(caption)
    assert random is not None
    ids: list = ["<start>", *tokens, "<end>"]
    deleted_idx = []
    for i, token in enumerate(ids):
        prob = random.random()
        if prob < 0.20:
            prob /= 0.20
            if prob < 0.5:  # 50% randomly change token to mask token
                ids[i] = vocab.word2idx["<mask>"]
            elif prob < 0.6:  # 10% randomly change token to random token
                ids[i] = random.randrange(len(vocab))
            else:  # 40% randomly remove the token
                ids[i] = vocab(token)
                deleted_idx.append(i)
        else:
            ids[i] = vocab(token)
    if len(deleted_idx) != 0:
        ids = [ids[i] for i in range(len(ids)) if i not in deleted_idx]
    return torch.Tensor(ids)


def collate_regions(images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """collate_fn's region branch: zero-padded [B, max n, D] and the lengths (a float tensor, as theirs)."""
    img_lengths = [len(image) for image in images]
    all_images = torch.zeros(len(images), max(img_lengths), images[0].size(-1))
    for i, image in enumerate(images):
        end = img_lengths[i]
        all_images[i, :end] = image[:end]
    return all_images, torch.Tensor(img_lengths)


# --- training options, the model and its checkpoint ----------------------------------------------------------------


def options(**changes: object) -> argparse.Namespace:
    """Branch bigru arguments.py defaults with train_region.sh's flags, as `train.py` saves them: `vocab_size` set
    to the vocabulary with <mask>, and `max_violation` True once the warmup epoch is over."""
    opt = argparse.Namespace(
        data_path="/tmp/data/f30k", data_name="f30k", vocab_path="/tmp/data/vocab", margin=0.2, num_epochs=25,
        batch_size=128, word_dim=300, embed_size=1024, num_layers=1, grad_clip=2.0, learning_rate=0.0005,
        lr_update=15, optim="adam", workers=10, log_step=200, val_step=500,
        logger_name="runs/f30k_butd_region_bigru/log", model_name="runs/f30k_butd_region_bigru", resume="",
        max_violation=True, img_dim=2048, no_imgnorm=False, no_txtnorm=False, precomp_enc_type="basic",
        backbone_path="", backbone_source="detector", vse_mean_warmup_epochs=1, reset_start_epoch=False,
        backbone_warmup_epochs=5, embedding_warmup_epochs=2, backbone_lr_factor=0.01, input_scale_factor=1,
        drop=True, vocab_size=8482,
    )  # fmt: skip
    for key, value in changes.items():
        setattr(opt, key, value)
    return opt


class VseInftyModel:
    """VSE∞'s two encoders for `opt` (lib/vse.py VSEModel, precomp_enc_type 'basic'), seeded, with the BatchNorm's
    running statistics set to random values so that evaluation depends on them."""

    def __init__(self, opt: argparse.Namespace, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.opt = opt
        self.img_enc = EncoderImageAggr(opt.img_dim, opt.embed_size, opt.precomp_enc_type, opt.no_imgnorm)
        self.txt_enc = EncoderText(opt.vocab_size, opt.embed_size, opt.word_dim, opt.num_layers, True, opt.no_txtnorm)
        for bn in self.img_enc.mlp.bns:
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.normal_(std=0.1)
            bn.num_batches_tracked.fill_(1000)
        self.val_start()

    def state_dict(self) -> list[dict[str, Tensor]]:  # VSEModel.state_dict
        return [self.img_enc.state_dict(), self.txt_enc.state_dict()]

    def val_start(self) -> None:
        self.img_enc.eval()
        self.txt_enc.eval()

    def train_start(self) -> None:
        self.img_enc.train()
        self.txt_enc.train()

    def encode_images(self, images: Sequence[Tensor]) -> Tensor:
        """[B, E] for per-image region features [n_i, D], batched as collate_fn pads them."""
        features, lengths = collate_regions(images)
        return self.img_enc(features, lengths)

    def encode_captions(self, token_ids: Sequence[Sequence[int]]) -> Tensor:
        """[B, E] in the given order for framed token-id lists (collate_fn sorts them longest first)."""
        return encode_sorted(self.txt_enc, token_ids)

    @torch.no_grad()
    def scores(self, images: Sequence[Tensor], token_ids: Sequence[Sequence[int]]) -> Tensor:
        """[n_image, n_caption] as evaluation.py `compute_sim`: the dot products of the two embeddings."""
        return get_sim(self.encode_images(images), self.encode_captions(token_ids))


def encode_sorted(encoder: Callable[[Tensor, Tensor], Tensor], token_ids: Sequence[Sequence[int]]) -> Tensor:
    """`encoder(padded ids, lengths)` on the captions longest first (collate_fn), rows back in the given order."""
    order, lengths, padded = length_sorted(token_ids)
    embedded = encoder(padded, torch.tensor(lengths))
    result = torch.empty_like(embedded)
    result[order] = embedded
    return result


def save_checkpoint(model: VseInftyModel, path: Path) -> None:
    """train.py save_checkpoint's dict: {'epoch', 'model': [img_enc, txt_enc states], 'best_rsum', 'opt', 'Eiters'}."""
    save_training_state(model.state_dict(), model.opt, path, epoch=22, best_rsum=498.1, legacy=False)
