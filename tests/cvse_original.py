"""A transcription of BruceW91/CVSE's modules and test-time scoring (`model_CVSE.py`, `util/C_GCN.py`,
`util/util_C_GCN.py`, `data.py`, `evaluation.py` at 94c2191), brought to current PyTorch (no `Variable`, explicit
softmax dims, integer division where Python 2 divided ints), and the files CVSE writes and ships: its checkpoint,
its concept files and its vocabulary pickle. The ground truth that imported CVSE checkpoints are checked against.

Only what runs at evaluation is kept of each module's branches: `use_BatchNorm` true, `activation_type` tanh,
`feature_fuse_type` weight_sum, `measure` cosine, `conv_mode` whole_graph, adjacency mode 'Complex'.
"""

from __future__ import annotations

import argparse
import json
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itm.data.text import tokenize
from tests import scan_original
from tests.scan_original import length_sorted, save_training_state


def l2norm(x: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:  # CVSE util/utils.py
    norm = torch.pow(x, 2).sum(dim=dim, keepdim=True).sqrt() + eps
    return torch.div(x, norm)


class EncoderImagePrecomp(scan_original.EncoderImagePrecomp):  # model_CVSE.py: SCAN's, with the visual memory
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = l2norm(self.fc(images), dim=-1)
        return features, torch.mean(features, 1)  # the visual memory: the plain mean of the regions


class EncoderText(nn.Module):  # model_CVSE.py, wemb_type random_init (weights are loaded), GRU, no_txtnorm False
    def __init__(self, vocab_size: int, word_dim: int, embed_size: int, num_layers: int, bi_gru: bool,
                 dropout_rate: float) -> None:  # fmt: skip
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.use_bidirectional_RNN = bi_gru
        self.rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True, bidirectional=bi_gru)
        self.dropout = nn.Dropout(dropout_rate)
        nn.init.xavier_uniform_(self.embed.weight)

    def forward(self, x: Tensor, lengths: Sequence[int]) -> tuple[Tensor, Tensor]:
        x = self.dropout(self.embed(x))
        packed = pack_padded_sequence(x, torch.as_tensor(lengths), batch_first=True)  # sorted by collate_fn
        out, _ = self.rnn(packed)
        cap_emb, _ = pad_packed_sequence(out, batch_first=True)
        if self.use_bidirectional_RNN:
            half = cap_emb.size(2) // 2
            cap_emb = (cap_emb[:, :, :half] + cap_emb[:, :, half:]) / 2
        cap_emb = l2norm(cap_emb, dim=-1)
        cap_emb_mean = l2norm(torch.mean(cap_emb, 1))  # the mean runs over the padded length
        return cap_emb, cap_emb_mean


class V_single_modal_atten(nn.Module):  # noqa: N801  (CVSE's name)
    """model_CVSE.py, use_bn True, tanh: every layer CVSE creates, used or not, so the state dict is CVSE's."""

    def __init__(self, image_dim: int, embed_dim: int, dropout_rate: float, img_region_num: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(image_dim, embed_dim)
        self.fc2 = nn.Linear(image_dim, embed_dim)
        self.fc2_2 = nn.Linear(embed_dim, embed_dim)
        self.fc3 = nn.Linear(embed_dim, 1)
        self.fc4 = nn.Linear(image_dim, embed_dim)
        self.embedding_1 = nn.Sequential(self.fc1, nn.BatchNorm1d(img_region_num), nn.Tanh(), nn.Dropout(dropout_rate))
        self.embedding_2 = nn.Sequential(self.fc2, nn.BatchNorm1d(embed_dim), nn.Tanh(), nn.Dropout(dropout_rate))
        self.embedding_2_2 = nn.Sequential(self.fc2_2, nn.BatchNorm1d(embed_dim), nn.Tanh(), nn.Dropout(dropout_rate))
        self.embedding_3 = nn.Sequential(self.fc3)
        self.softmax = nn.Softmax(dim=1)

    def forward(self, v_t: Tensor, m_v: Tensor) -> Tensor:
        W_v = self.embedding_1(v_t)  # noqa: N806
        W_v_m = self.embedding_2(m_v) if m_v.size()[-1] == v_t.size()[-1] else self.embedding_2_2(m_v)  # noqa: N806
        W_v_m = W_v_m.unsqueeze(1).repeat(1, W_v.size()[1], 1)  # noqa: N806
        a_v = self.embedding_3(W_v.mul(W_v_m)).squeeze(2)
        weights = self.softmax(a_v)
        return l2norm((weights.unsqueeze(2) * v_t).sum(dim=1))


class T_single_modal_atten(nn.Module):  # noqa: N801  (model_CVSE.py, tanh)
    def __init__(self, embed_dim: int, dropout_rate: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, embed_dim)
        self.fc2 = nn.Linear(embed_dim, embed_dim)
        self.fc3 = nn.Linear(embed_dim, 1)
        self.embedding_1 = nn.Sequential(self.fc1, nn.Tanh(), nn.Dropout(dropout_rate))
        self.embedding_2 = nn.Sequential(self.fc2, nn.Tanh(), nn.Dropout(dropout_rate))
        self.embedding_3 = nn.Sequential(self.fc3)
        self.softmax = nn.Softmax(dim=1)

    def forward(self, u_t: Tensor, m_u: Tensor) -> Tensor:
        W_u = self.embedding_1(u_t)  # noqa: N806
        W_u_m = self.embedding_2(m_u).unsqueeze(1).repeat(1, W_u.size()[1], 1)  # noqa: N806
        weights = self.softmax(self.embedding_3(W_u.mul(W_u_m)).squeeze(2))  # padded words take part
        return l2norm((weights.unsqueeze(2) * u_t).sum(dim=1))


class Multi_feature_fusing(nn.Module):  # noqa: N801  (model_CVSE.py, weight_sum: no layers)
    def forward(self, v_inst: Tensor, t_inst: Tensor, v_cons: Tensor, t_cons: Tensor, alpha: float) -> tuple:
        return l2norm(alpha * v_inst + (1 - alpha) * v_cons), l2norm(alpha * t_inst + (1 - alpha) * t_cons)


class Consensus_level_feature_learning(nn.Module):  # noqa: N801  (model_CVSE.py, use_bn True, tanh)
    def __init__(self, image_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(image_dim, embed_dim)
        self.fc2 = nn.Linear(embed_dim, embed_dim)
        self.fc3 = nn.Linear(embed_dim, 1)
        self.embedding_1 = nn.Sequential(self.fc1, nn.BatchNorm1d(embed_dim), nn.Tanh())
        self.embedding_2 = nn.Sequential(self.fc2, nn.BatchNorm1d(embed_dim), nn.Tanh())
        self.embedding_3 = nn.Sequential(self.fc3)
        self.softmax = nn.Softmax(dim=1)
        self.smooth_coef = 10

    def forward(self, emb_instance: Tensor, concept_feature: Tensor, input_modal: str, GT_label: Tensor | None,  # noqa: N803
                GT_label_ratio: float | None) -> Tensor:  # noqa: N803  # fmt: skip
        W_s = self.embedding_1(concept_feature)  # noqa: N806
        W_v_m = self.embedding_2(emb_instance).unsqueeze(1).repeat(1, W_s.size()[0], 1)  # noqa: N806
        a_s = self.embedding_3(W_s.mul(W_v_m)).squeeze(2)
        weights = self.softmax(a_s * self.smooth_coef)
        if input_modal == "textual":
            weights = GT_label_ratio * self.softmax(GT_label * self.smooth_coef) + (1 - GT_label_ratio) * weights
        return l2norm((weights.unsqueeze(2) * l2norm(concept_feature)).sum(dim=1))


class GraphConvolution(nn.Module):  # util/C_GCN.py, bias False
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.register_parameter("bias", None)
        stdv = 1.0 / np.sqrt(self.weight.size(1))
        self.weight.data.uniform_(-stdv, stdv)

    def forward(self, x: Tensor, adj: dict[str, Tensor]) -> Tensor:
        return torch.matmul(adj["adj_all"], torch.matmul(x, self.weight))  # conv_mode 'whole_graph'


def rescale_adj_matrix(adj_mat: np.ndarray, t: float = 5, p: float = 0.02) -> np.ndarray:  # util/util_C_GCN.py
    return np.power(t, adj_mat - p) - np.power(t, -p)


def gen_A_concept(num_classes: int, t: float, result: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # noqa: N802
    """util/util_C_GCN.py gen_A_concept, gen_mode 'Complex', for the pickle's content `result`."""
    nums = result["nums"][:, np.newaxis]
    adjacency = {}
    for key in ("adj_O_P", "adj_O_M", "adj_all"):
        adj = rescale_adj_matrix(result[key] / nums)
        adj[adj < t] = 0
        adj[adj >= t] = 1
        adj = adj * 0.25 / (adj.sum(0, keepdims=True) + 1e-6)
        if key != "adj_all":
            adj = adj / (adj.sum(0, keepdims=True) + 1e-8)
        adjacency[key] = adj + np.identity(num_classes, int)
    return adjacency


def gen_adj(A: Tensor) -> Tensor:  # noqa: N803  (util/util_C_GCN.py)
    D = torch.diag(torch.pow(A.sum(1).float(), -0.5))  # noqa: N806
    return torch.matmul(torch.matmul(A, D).t(), D)


class C_GCN(nn.Module):  # noqa: N801  (util/C_GCN.py)
    def __init__(self, num_classes: int, in_channel: int, t: float, adjacency_file: dict, embed_size: int) -> None:
        super().__init__()
        self.gc1 = GraphConvolution(in_channel, embed_size // 2)
        self.gc2 = GraphConvolution(embed_size // 2, embed_size)
        self.relu = nn.LeakyReLU(0.2)
        adj = gen_A_concept(num_classes, t, adjacency_file)
        self.adj_O_P = nn.Parameter(torch.from_numpy(adj["adj_O_P"]).float())
        self.adj_O_M = nn.Parameter(torch.from_numpy(adj["adj_O_M"]).float())
        self.adj_all = nn.Parameter(torch.from_numpy(adj["adj_all"]).float())
        self.joint_att_emb = nn.Linear(embed_size, embed_size)

    def forward(self, feature: Tensor, inp: Tensor) -> Tensor:
        inp = inp[0]  # the collated batch repeats the concept vectors per caption
        adj = {"adj_all": gen_adj(self.adj_all).detach()}
        return l2norm(self.gc2(self.relu(self.gc1(inp, adj)), adj))


def options(**changes: object) -> argparse.Namespace:
    """CVSE train_f30k.py's argparse defaults (store_false flags True), with `changes`; `vocab_size` is set by
    main() before the options are saved."""
    prefix = "data/f30k_annotations/Concept_annotations_f30k/"
    opt = argparse.Namespace(
        data_path="./Bottom_up_atten_feature/data", data_name="f30k_precomp", vocab_path="./vocab/",
        orig_img_path="./data/", orig_data_name="f30k", use_restval=True, margin=0.2, num_epochs=50, batch_size=128,
        word_dim=300, embed_size=1024, grad_clip=2.0, num_layers=1, learning_rate=0.0002, lr_update=25, workers=40,
        log_step=200, val_step=2000, logger_name="./runs/f30k/CVSE_f30k/log", model_name="./runs/f30k/CVSE_f30k/",
        resume="./runs/f30k/CVSE_f30k/model_best.pth.tar", max_violation=True, img_dim=2048, no_imgnorm=False,
        no_txtnorm=False, precomp_enc_type="basic", bi_gru=True, use_BatchNorm=True, activation_type="tanh",
        dropout_rate=0.4, use_abs=False, measure="cosine", attribute_path=prefix, num_attribute=300,
        input_channel=300, inp_name=prefix + "f30k_concepts_glove_word2vec.pkl",
        adj_file=prefix + "f30k_adj_concepts.pkl", learning_rate_MLGCN=0.0002, lr_MLGCN_update=10,
        Concept_label_ratio=0.35, concept_name=prefix + "category_concepts.json", norm_func_type="sigmoid",
        feature_fuse_type="weight_sum", wemb_type="glove",
    )  # fmt: skip
    for key, value in changes.items():
        setattr(opt, key, value)
    return opt


class CvseModel:
    """CVSE's eight modules for `opt` and the content of its adjacency file, seeded; BatchNorm statistics and
    affine parameters randomised so that evaluation-mode normalisation matters."""

    def __init__(self, opt: argparse.Namespace, adjacency_file: dict, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.opt = opt
        e = opt.embed_size
        self.img_enc = EncoderImagePrecomp(opt.img_dim, e)
        self.txt_enc = EncoderText(opt.vocab_size, opt.word_dim, e, opt.num_layers, opt.bi_gru, opt.dropout_rate)
        self.V_self_atten_enhance = V_single_modal_atten(e, e, opt.dropout_rate, img_region_num=36)
        self.T_self_atten_enhance = T_single_modal_atten(e, opt.dropout_rate)
        self.V_consensus_level_embedding = Consensus_level_feature_learning(e, e)
        self.T_consensus_level_embedding = Consensus_level_feature_learning(e, e)
        self.C_GCN = C_GCN(opt.num_attribute, opt.input_channel, 0.3, adjacency_file, e)
        self.Multi_feature_fusing = Multi_feature_fusing()
        for module in self.modules():
            for layer in module.modules():
                if isinstance(layer, nn.BatchNorm1d):
                    layer.running_mean.uniform_(-0.3, 0.3)
                    layer.running_var.uniform_(0.5, 2.0)
                    layer.weight.data.uniform_(0.5, 1.5)
                    layer.bias.data.uniform_(-0.2, 0.2)
            module.eval()  # val_start

    def modules(self) -> list[nn.Module]:
        return [self.img_enc, self.txt_enc, self.V_self_atten_enhance, self.T_self_atten_enhance,
                self.V_consensus_level_embedding, self.T_consensus_level_embedding, self.C_GCN,
                self.Multi_feature_fusing]  # fmt: skip

    def state_dict(self) -> list[dict[str, Tensor]]:  # model_CVSE.py CVSE.state_dict
        return [module.state_dict() for module in self.modules()]

    def load_state_dict(self, state: Sequence[dict[str, Tensor]]) -> None:
        for module, part in zip(self.modules(), state, strict=True):
            module.load_state_dict(part)

    @torch.no_grad()
    def encode_images(self, images: Tensor, concept_inputs: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
        """The visual half of CVSE.forward_emb: fused and consensus embeddings of region features [B, 36, D]."""
        img_emb, img_emb_mean = self.img_enc(images)
        instance_v = self.V_self_atten_enhance(img_emb, img_emb_mean)
        basis_v = self.C_GCN(instance_v, concept_inputs)
        consensus_v = self.V_consensus_level_embedding(instance_v, basis_v, "visual", None, None)
        fused_v, _ = self.Multi_feature_fusing(instance_v, instance_v, consensus_v, consensus_v, alpha)
        return fused_v, consensus_v

    @torch.no_grad()
    def encode_captions(self, captions: Tensor, lengths: Sequence[int], labels: Tensor, concept_inputs: Tensor,
                        alpha: float) -> tuple[Tensor, Tensor]:  # fmt: skip
        """The textual half of CVSE.forward_emb (every module is per item in eval mode, so the halves may run
        apart): fused and consensus embeddings of captions sorted by length, with their concept labels [B, K]."""
        cap_emb, cap_emb_mean = self.txt_enc(captions, lengths)
        instance_t = self.T_self_atten_enhance(cap_emb, cap_emb_mean)
        basis_t = self.C_GCN(instance_t, concept_inputs)
        ratio = self.opt.Concept_label_ratio
        consensus_t = self.T_consensus_level_embedding(instance_t, basis_t, "textual", labels, ratio)
        _, fused_t = self.Multi_feature_fusing(instance_t, instance_t, consensus_t, consensus_t, alpha)
        return fused_t, consensus_t

    def scores(self, features: Tensor, token_ids: Sequence[Sequence[int]], labels: Tensor,
               concept_vectors: np.ndarray) -> Tensor:  # fmt: skip
        """[n_image, n_caption] test scores (evaluation.py `i2t_sep_sim`: 0.95 cos(fused) + 0.05 cos(consensus);
        fusion α 0.9 for COCO, 0.85 for Flickr30K, `evalrank`) for region features [n_image, 36, D], framed
        token-id lists and their concept labels [n_caption, K]; captions sorted by length as collate_fn does."""
        alpha = 0.9 if "coco" in self.opt.data_name else 0.85
        order, lengths, padded = length_sorted(token_ids)
        inputs = torch.Tensor(concept_vectors)[None].repeat(len(order), 1, 1)  # collate_fn stacks one per item
        fused_t, consensus_t = self.encode_captions(padded, lengths, labels[order], inputs, alpha)
        fused_v, consensus_v = self.encode_images(features, inputs, alpha)
        sorted_scores = 0.95 * fused_v @ fused_t.T + 0.05 * consensus_v @ consensus_t.T
        scores = torch.empty_like(sorted_scores)
        scores[:, order] = sorted_scores
        return scores


def save_checkpoint(model: CvseModel, path: Path, *, legacy: bool = False) -> None:
    """train_f30k.py save_checkpoint's dict; `legacy`: the pre-1.6 file format of CVSE's PyTorch."""
    save_training_state(model.state_dict(), model.opt, path, epoch=31, best_rsum=497.6, legacy=legacy)


def adjacency_content(words: Sequence[str], captions: Sequence[Sequence[str]]) -> dict[str, np.ndarray]:
    """What `<data>_adj_concepts.pkl` holds for concepts counted over `captions` (token lists): `nums` [K] int32,
    each concept's count, and `adj_O_P`, `adj_O_M`, `adj_all` [K, K] int32 co-occurrence counts, zero diagonal."""
    present = np.array([[word in set(caption) for word in words] for caption in captions], dtype=np.int32)
    cooccurrence = present.T @ present
    nums = np.diag(cooccurrence).copy()
    np.fill_diagonal(cooccurrence, 0)
    return {"nums": nums, "adj_O_P": cooccurrence // 2, "adj_O_M": cooccurrence - cooccurrence // 2,
            "adj_all": cooccurrence}  # fmt: skip


def write_concept_files(folder: Path, words: Sequence[str], adjacency: dict[str, np.ndarray],
                        vectors: np.ndarray) -> tuple[Path, Path, Path]:  # fmt: skip
    """category_concepts.json ({word: id}), f30k_adj_concepts.pkl and f30k_concepts_glove_word2vec.pkl ([K, 300]
    float64), pickled with protocol 3 as CVSE's are."""
    folder.mkdir(parents=True, exist_ok=True)
    categories, graph, glove = (folder / "category_concepts.json", folder / "f30k_adj_concepts.pkl",
                                folder / "f30k_concepts_glove_word2vec.pkl")  # fmt: skip
    categories.write_text(json.dumps({word: i for i, word in enumerate(words)}))
    graph.write_bytes(pickle.dumps(adjacency, protocol=3))
    glove.write_bytes(pickle.dumps(np.asarray(vectors, dtype=np.float64), protocol=3))
    return categories, graph, glove


class Vocabulary:
    """SCAN's vocab.py `Vocabulary` as CVSE pickles it (`vocab/<data>_precomp_vocab.pkl`, from a script run as
    __main__)."""

    def __init__(self, words: Sequence[str]) -> None:
        self.word2idx = {w: i for i, w in enumerate(words)}
        self.idx2word = dict(enumerate(words))
        self.idx = len(words)


def write_vocabulary(words: Sequence[str], path: Path) -> None:
    """A protocol-2 pickle of `__main__.Vocabulary` holding `words`, as CVSE ships it."""
    import __main__

    Vocabulary.__module__, Vocabulary.__qualname__ = "__main__", "Vocabulary"
    __main__.Vocabulary = Vocabulary  # type: ignore[attr-defined]
    try:
        path.write_bytes(pickle.dumps(Vocabulary(words), protocol=2))
    finally:
        del __main__.Vocabulary  # type: ignore[attr-defined]
        Vocabulary.__module__, Vocabulary.__qualname__ = __name__, "Vocabulary"


def encode_caption(words: Sequence[str], text: str) -> list[int]:
    """data.py __getitem__: <start>, vocab(token) of nltk's tokens (unknown as <unk>), <end>."""
    ids = {word: i for i, word in enumerate(words)}
    return [ids["<start>"], *(ids.get(token, ids["<unk>"]) for token in tokenize(text, "nltk")), ids["<end>"]]


def caption_labels(text: str, concept_words: Sequence[str], lemmatize: Callable[[str], str]) -> np.ndarray:
    """data.py __getitem__ outside training: each token's lemma marks the first concept whose lemma it is."""
    name_concepts = [lemmatize(word) for word in concept_words]
    labels = np.zeros(len(concept_words), np.float32)
    for word in tokenize(text, "nltk"):
        lemma = lemmatize(word)
        if lemma in name_concepts:
            labels[name_concepts.index(lemma)] = 1
    return labels


NOUN_RULES = [("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
              ("men", "man"), ("ies", "y")]  # fmt: skip


def nltk_lemmatizer(nouns: set[str], exceptions: dict[str, list[str]]) -> Callable[[str], str]:
    """NLTK 3.4's `WordNetLemmatizer().lemmatize` (noun) over WordNet's noun index and exception list."""

    def morphy(form: str) -> list[str]:
        def apply_rules(forms: list[str]) -> list[str]:
            return [form[: -len(old)] + new for form in forms for old, new in NOUN_RULES if form.endswith(old)]

        def filter_forms(forms: list[str]) -> list[str]:
            result: list[str] = []
            for form in forms:
                if form in nouns and form not in result:
                    result.append(form)
            return result

        if form in exceptions:
            return filter_forms([form, *exceptions[form]])
        forms = apply_rules([form])
        results = filter_forms([form, *forms])
        if results:
            return results
        while forms:
            forms = apply_rules(forms)
            results = filter_forms(forms)
            if results:
                return results
        return []

    def lemmatize(word: str) -> str:
        lemmas = morphy(word)
        return min(lemmas, key=len) if lemmas else word

    return lemmatize
