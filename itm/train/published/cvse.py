"""BruceW91/CVSE checkpoints (`model_best.pth.tar`) and concept files as our `cvse` matcher in CVSE's layout.

The checkpoint is `torch.save({'epoch', 'model': CVSE.state_dict(), 'best_rsum', 'opt', 'Eiters'})` (CVSE
`train_f30k.py`/`train_coco.py`), `model` the list of its eight modules' state dicts (`model_CVSE.py`
`CVSE.state_dict`), `opt` the `argparse.Namespace` of its training options. Each module maps onto ours:

    [0] EncoderImagePrecomp     fc.*                          -> image_encoder.regions.fc.*
    [1] EncoderText             embed.weight                  -> text_encoder.words.embed.weight
                                rnn.{weight,bias}_{ih,hh}_l0[_reverse] -> text_encoder.words.gru.*
    [2] V_single_modal_atten    fc1.* (= embedding_1.0.*)     -> image_encoder.attention.fragment.*
                                embedding_1.1.* BatchNorm1d(36) -> image_encoder.attention.fragment_norm.* (slots)
                                fc2.* (= embedding_2.0.*)     -> image_encoder.attention.memory.*
                                embedding_2.1.* BatchNorm1d(E) -> image_encoder.attention.memory_norm.*
                                fc3.* (= embedding_3.0.*)     -> image_encoder.attention.score.*
                                fc2_2.*, embedding_2_2.* (a memory of another size than the regions: never),
                                fc4.* (never called)          -> unused
    [3] T_single_modal_atten    fc1.*, fc2.*, fc3.* (= embedding_{1,2,3}.0.*) -> text_encoder.attention.
                                                                 {fragment,memory,score}.*
    [4] Consensus_level_feature_learning (visual), [5] (textual), -> {image,text}_encoder.predictor.*:
                                fc1.* (= embedding_1.0.*)     -> concept_branch.0.*  (applied to the concepts)
                                embedding_1.1.* BatchNorm1d(E) -> concept_branch.1.*
                                fc2.* (= embedding_2.0.*)     -> instance_branch.0.* (applied to the instance)
                                embedding_2.1.* BatchNorm1d(E) -> instance_branch.1.*
                                fc3.* (= embedding_3.0.*)     -> score.*
    [6] C_GCN                   gc1.weight, gc2.weight        -> {image,text}_encoder.graph.weight_{hidden,out}
                                adj_all (K x K, 'Complex' mode, before `gen_adj`) -> graph.adjacency = gen_adj(adj_all)
                                adj_O_P, adj_O_M ('dual_graph' mode only), joint_att_emb.* (never called) -> unused
    [7] Multi_feature_fusing    nothing (weight_sum)
    the concept files           <data>_concepts_glove_word2vec.pkl -> graph.inputs;
                                category_concepts.json + the vocabulary -> text_encoder.word_concepts
    ours only                   loss.* (a fresh ConsensusLoss's buffers), num_batches_tracked of a BatchNorm that a
                                pre-0.4.1 PyTorch saved without one (0)

The graph is the checkpoint's own (`adj_all` is a `Parameter` that `load_state_dict` restores) and must equal the
one the adjacency file gives (else the file is not the checkpoint's). The options pick sizes, the bi-GRU, β
(`Concept_label_ratio`) and the test fusion α (0.9 for COCO, 0.85 for Flickr30K: `evalrank`); CVSE hard-codes the
rest (`img_region_num` 36, `smooth_coef` 10, the graph's τ 0.3, rescaling t = 5 and p = 0.02 and re-weighting 0.25,
training α 0.85, `weight_fused` 0.95, loss weights [3, 5, 1, 2]). What our `cvse` matcher does not build is refused
by name: other `feature_fuse_type`s (`multiple`; `concat` and `adap_sum` crash in CVSE), `use_BatchNorm` false
(CVSE then adds tanh and dropout after the visual fc3), `activation_type` sigmoid, `precomp_enc_type` weight_norm,
`no_imgnorm`, `no_txtnorm`, `use_abs`, `measure` order, more than one GRU layer.

A test caption's concepts (CVSE `data.py`, `PrecompDataset_Flickr30k.__getitem__` outside training): every token
of the caption, reduced to its WordNet noun lemma (`WordNetLemmatizer().lemmatize(word)`), marks the first concept
whose lemmatised word it equals. Here the caption's word ids do that through a table built once from the
vocabulary (`word_concepts`), so a word outside the vocabulary (`<unk>`) marks no concept, where CVSE lemmatises
the raw token. The lemmas are WordNet 3.0's, by NLTK's `morphy` of CVSE's time (below); `lemmas: exact` uses the
words as they are instead (not CVSE's protocol).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from itm.config import CvseParams
from itm.data.concepts import Concepts
from itm.errors import UserError
from itm.models.consensus import concept_adjacency
from itm.models.cvse import ConsensusLoss
from itm.safe_load import load_pickle

log = logging.getLogger(__name__)

MODULES = ("img_enc", "txt_enc", "V_self_atten_enhance", "T_self_atten_enhance", "V_consensus_level_embedding",
           "T_consensus_level_embedding", "C_GCN", "Multi_feature_fusing")  # fmt: skip
IMAGE_KEYS = {"fc.weight", "fc.bias"}
BATCH_NORM = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
GRU_TENSORS = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
REGION_SLOTS = 36  # CVSE.__init__: img_region_num = 36
SMOOTHING = 10.0  # Consensus_level_feature_learning.smooth_coef
TRAIN_ALPHA = 0.85  # CVSE.fuse_weight
FUSED_SCORE_WEIGHT = 0.95  # evalrank: i2t_sep_sim(..., weight_fused=0.95)
LOSS_WEIGHTS = (3.0, 5.0, 1.0, 2.0)  # CVSE.forward_loss
GRAPH = {"graph_threshold": 0.3, "graph_rescale_base": 5.0, "graph_rescale_shift": 0.02, "graph_reweight": 0.25}
# option -> the only value our cvse matcher builds
REQUIRED_OPTIONS = {
    "feature_fuse_type": "weight_sum",
    "use_BatchNorm": True,
    "activation_type": "tanh",
    "precomp_enc_type": "basic",
    "no_imgnorm": False,
    "no_txtnorm": False,
    "use_abs": False,
    "measure": "cosine",
    "num_layers": 1,
}
# our CvseParams key -> how to read it from the options
OPTION_KEYS = {
    "embed_dim": "embed_size",
    "word_dim": "word_dim",
    "bidirectional": "bi_gru",
    "dropout": "dropout_rate",
    "label_ratio": "Concept_label_ratio",
    "concept_input_dim": "input_channel",
    "margin": "margin",
    "max_violation": "max_violation",
}
OTHER_OPTIONS = ("data_name", "num_attribute", "img_dim")


# --- the concept files ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CvseConcepts:
    """CVSE's concept files, read: the concept words in id order, each one's count and their co-occurrence counts
    (`<data>_adj_concepts.pkl`: `nums`, `adj_all` with a zero diagonal), the GCN's input vectors, and how a word
    becomes a lemma (`lemmas`)."""

    words: tuple[str, ...]
    counts: np.ndarray  # [K] int64
    cooccurrence: np.ndarray  # [K, K] int64, zero diagonal
    vectors: np.ndarray  # [K, I] float32
    lemmatize: Callable[[str], str]
    lemmas: str  # "wordnet (<folder>)" or "exact"

    def __len__(self) -> int:
        return len(self.words)

    def as_concepts(self) -> Concepts:
        """Our `Concepts` (co-occurrence with each concept's own count on the diagonal, the form
        `concept_adjacency` reads; CVSE's files do not say how many captions were counted)."""
        cooccurrence = self.cooccurrence.copy()
        np.fill_diagonal(cooccurrence, self.counts)
        return Concepts(self.words, tuple(int(n) for n in self.counts), cooccurrence, n_captions=0)

    def word_concepts(self, vocab_words: Sequence[str]) -> Tensor:
        """[V] the concept id each vocabulary word marks, −1 for none (CVSE `data.py`: `name_concepts` holds the
        lemmatised concept words, and a token marks `name_concepts.index(lemmatize(token))`, the first match)."""
        first: dict[str, int] = {}
        for index, word in enumerate(self.words):
            first.setdefault(self.lemmatize(word), index)
        return torch.tensor([first.get(self.lemmatize(word), -1) for word in vocab_words], dtype=torch.int64)


def read_cvse_concepts(
    categories: Path, adjacency: Path, word_vectors: Path, lemmas: Literal["wordnet", "exact"]
) -> CvseConcepts:
    """CVSE's `category_concepts.json`, `<data>_adj_concepts.pkl` and `<data>_concepts_glove_word2vec.pkl`, checked
    to describe the same concepts; `UserError` naming the file otherwise."""
    try:
        document = json.loads(categories.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{categories}: not a readable concept list ({type(error).__name__}: {error})") from None
    if not isinstance(document, Mapping) or list(document.values()) != list(range(len(document))):
        raise UserError(f"{categories}: not CVSE's concept list ({{word: id}} with ids 0, 1, ... in file order)")
    words = tuple(str(word) for word in document)
    graph = load_pickle(adjacency, what="concept adjacency pickle")
    if not isinstance(graph, Mapping) or not {"nums", "adj_all"} <= set(graph):
        raise UserError(f"{adjacency}: not CVSE's concept adjacency (a dict with `nums` and `adj_all`)")
    counts, cooccurrence = np.asarray(graph["nums"]), np.asarray(graph["adj_all"])
    vectors = load_pickle(word_vectors, what="concept word vectors pickle")
    if not isinstance(vectors, np.ndarray) or vectors.ndim != 2:
        raise UserError(f"{word_vectors}: not CVSE's concept vectors (a [concepts, dim] numpy array)")
    k = len(words)
    for path, shape, expected in ((adjacency, counts.shape, (k,)), (adjacency, cooccurrence.shape, (k, k)),
                                  (word_vectors, vectors.shape[:1], (k,))):  # fmt: skip
        if shape != expected:
            raise UserError(f"{path}: shape {shape} does not fit the {k} concepts of {categories}")
    lemmatize, source = _lemmatizer(lemmas)
    return CvseConcepts(words, counts.astype(np.int64), cooccurrence.astype(np.int64), vectors.astype(np.float32),
                        lemmatize, source)  # fmt: skip


# --- WordNet lemmas ---------------------------------------------------------------------------------------------------

WORDNET_NOUN_RULES = (("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"), ("ches", "ch"),
                      ("shes", "sh"), ("men", "man"), ("ies", "y"))  # fmt: skip  # NLTK MORPHOLOGICAL_SUBSTITUTIONS


def wordnet_folders() -> list[Path]:
    """Where a WordNet 3.0 database (`index.noun`, `noun.exc`) is looked for: $WNSEARCHDIR (WordNet's own
    variable), Debian's `wordnet-base`, WordNet's default install, and `corpora/wordnet` in each $NLTK_DATA folder."""
    folders = [Path(os.environ["WNSEARCHDIR"])] if os.environ.get("WNSEARCHDIR") else []
    folders += [Path("/usr/share/wordnet"), Path("/usr/local/WordNet-3.0/dict")]
    folders += [Path(p) / "corpora" / "wordnet" for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    return folders


class WordNetNouns:
    """NLTK's `WordNetLemmatizer().lemmatize(word)` (part of speech noun, the default CVSE uses) over a WordNet
    database folder: the shortest of the word's noun forms that WordNet knows (`_morphy`: the exception list
    `noun.exc`, else the suffix rules applied once, then again and again while nothing is found, the fallback of the
    NLTK of CVSE's time), or the word itself."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @cached_property
    def _nouns(self) -> frozenset[str]:
        lines = (self.folder / "index.noun").read_text(encoding="utf-8", errors="replace").splitlines()
        return frozenset(line.split(" ", 1)[0] for line in lines if line and not line.startswith(" "))

    @cached_property
    def _exceptions(self) -> dict[str, list[str]]:
        lines = (self.folder / "noun.exc").read_text(encoding="utf-8", errors="replace").splitlines()
        return {terms[0]: terms[1:] for terms in map(str.split, lines) if terms}

    def lemmatize(self, word: str) -> str:
        lemmas = self._morphy(word)
        return min(lemmas, key=len) if lemmas else word

    def _morphy(self, form: str) -> list[str]:
        def apply_rules(forms: list[str]) -> list[str]:
            return [f[: -len(old)] + new for f in forms for old, new in WORDNET_NOUN_RULES if f.endswith(old)]

        def known(forms: list[str]) -> list[str]:
            return list(dict.fromkeys(f for f in forms if f in self._nouns))

        if form in self._exceptions:
            return known([form, *self._exceptions[form]])
        forms = apply_rules([form])
        found = known([form, *forms])
        while not found and forms:
            forms = apply_rules(forms)
            found = known(forms)
        return found


def _lemmatizer(lemmas: Literal["wordnet", "exact"]) -> tuple[Callable[[str], str], str]:
    if lemmas == "exact":
        return (lambda word: word), "exact"
    for folder in wordnet_folders():
        if (folder / "index.noun").is_file() and (folder / "noun.exc").is_file():
            return WordNetNouns(folder).lemmatize, f"wordnet ({folder})"
    searched = ", ".join(str(folder) for folder in wordnet_folders())
    raise UserError(
        f"CVSE labels a caption by its words' WordNet lemmas, and no WordNet 3.0 database was found (looked in "
        f"{searched}): install one (Debian: apt-get install wordnet-base; or set WNSEARCHDIR), or set "
        "weights.concepts.lemmas: exact (the words as they are, not CVSE's protocol)"
    )


# --- the checkpoint ---------------------------------------------------------------------------------------------------


def is_cvse_checkpoint(content: Any) -> bool:
    """Whether `content` has CVSE's outer format: `model` = its eight modules' states (the image encoder's first)
    and `opt`."""
    if not isinstance(content, Mapping) or "opt" not in content:
        return False
    model = content.get("model")
    return isinstance(model, list | tuple) and len(model) == len(MODULES) and set(model[0]) == IMAGE_KEYS


def cvse_params(path: Path, options: Mapping[str, Any], block: CvseParams, concepts: CvseConcepts) -> CvseParams:
    """Our `cvse` params for a checkpoint trained with `options` and `concepts`: the block's, with every key CVSE's
    options or code fix taken from them. A key the block sets itself must agree; an option our matcher does not
    build is refused."""
    missing = [option for option in (*OPTION_KEYS.values(), *REQUIRED_OPTIONS, *OTHER_OPTIONS) if option not in options]
    if missing:
        raise UserError(f"{path}: not a CVSE checkpoint: its options have no {', '.join(missing)}")
    for option, supported in REQUIRED_OPTIONS.items():
        if options[option] != supported:
            raise UserError(f"{path}: trained with {option}={options[option]!r}; the cvse matcher builds {supported!r}")
    data_name = str(options["data_name"])
    if "coco" in data_name:  # evaluation.py evalrank: fuse_weight by data_name, 'coco' tested first
        alpha_test = 0.9
    elif "f30k" in data_name:
        alpha_test = 0.85
    else:
        raise UserError(f"{path}: trained with data_name={data_name!r}; CVSE's test fusion weight is known for names "
                        "containing 'coco' (0.9) or 'f30k' (0.85)")  # fmt: skip
    if int(options["num_attribute"]) != len(concepts):
        raise UserError(f"{path}: trained with num_attribute={options['num_attribute']}, but the concept files "
                        f"hold {len(concepts)} concepts: not its concept files")  # fmt: skip
    if int(options["input_channel"]) != concepts.vectors.shape[1]:
        raise UserError(f"{path}: trained with input_channel={options['input_channel']}, but the concept word "
                        f"vectors are {concepts.vectors.shape[1]}-d: not its concept files")  # fmt: skip
    values: dict[str, Any] = {key: options[option] for key, option in OPTION_KEYS.items()}
    values |= GRAPH | {"fusion": "weight_sum", "fusion_alpha": TRAIN_ALPHA, "fusion_alpha_test": alpha_test}
    values |= {"concept_smoothing": SMOOTHING, "fused_score_weight": FUSED_SCORE_WEIGHT, "loss_weights": LOSS_WEIGHTS}
    values |= {"region_norm": "slots", "region_slots": REGION_SLOTS, "caption_concepts": "words", "glove_path": None}
    for key in block.model_fields_set & set(values):
        if getattr(block, key) != values[key]:
            origin = f"{OPTION_KEYS[key]}={options[OPTION_KEYS[key]]!r}" if key in OPTION_KEYS else "CVSE's code"
            raise UserError(f"matchers: {key} is {getattr(block, key)!r}, but the checkpoint {path.name} has "
                            f"{values[key]!r} ({origin}); remove the key or fix it")  # fmt: skip
    return block.model_copy(update=values)


def cvse_state_dict(
    path: Path, model: Sequence[Mapping[str, Tensor]], params: CvseParams, concepts: CvseConcepts,
    vocab_words: Sequence[str],
) -> dict[str, Tensor]:  # fmt: skip
    """CVSE's eight module states, its concept files and the word -> concept table of `vocab_words` in our
    `Matcher`'s names (see the module docstring)."""
    modules = dict(zip(MODULES, model, strict=True))
    state = _mapped(path, "img_enc", modules["img_enc"], _linear("fc", "fc"), "image_encoder.regions.")
    words = {"embed.weight": "embed.weight"} | {f"rnn.{t}{s}": f"gru.{t}{s}" for t in GRU_TENSORS
                                                for s in ("", "_reverse")}  # fmt: skip
    state |= _mapped(path, "txt_enc", modules["txt_enc"], words, "text_encoder.words.")
    state |= _mapped(path, "V_self_atten_enhance", modules["V_self_atten_enhance"], _VISUAL_ATTENTION,
                     "image_encoder.attention.", aliases=_ALIASES, unused=_VISUAL_UNUSED)  # fmt: skip
    state |= _mapped(path, "T_self_atten_enhance", modules["T_self_atten_enhance"], _TEXT_ATTENTION,
                     "text_encoder.attention.", aliases=_ALIASES)  # fmt: skip
    for name, side in (("V_consensus_level_embedding", "image"), ("T_consensus_level_embedding", "text")):
        state |= _mapped(path, name, modules[name], _CONSENSUS, f"{side}_encoder.predictor.", aliases=_ALIASES)
    state |= _graph(path, modules["C_GCN"], concepts)
    fusing = sorted(modules["Multi_feature_fusing"])
    if fusing:
        raise UserError(f"{path}: Multi_feature_fusing has tensors ({', '.join(fusing)}); weight_sum fusion has none")
    state["text_encoder.word_concepts"] = concepts.word_concepts(vocab_words)
    loss = ConsensusLoss(params.margin, params.max_violation, params.loss_weights, weighting=params.loss_weighting,
                         temperature=params.dwa_temperature)  # fmt: skip
    state |= {f"loss.{key}": value for key, value in loss.state_dict().items()}
    return state


def _batch_norm(cvse: str, ours: str) -> dict[str, str]:
    return {f"{cvse}.{tensor}": f"{ours}.{tensor}" for tensor in BATCH_NORM}


def _linear(cvse: str, ours: str) -> dict[str, str]:
    return {f"{cvse}.{tensor}": f"{ours}.{tensor}" for tensor in ("weight", "bias")}


_VISUAL_ATTENTION = (_linear("fc1", "fragment") | _batch_norm("embedding_1.1", "fragment_norm")
                     | _linear("fc2", "memory") | _batch_norm("embedding_2.1", "memory_norm")
                     | _linear("fc3", "score"))  # fmt: skip
_TEXT_ATTENTION = _linear("fc1", "fragment") | _linear("fc2", "memory") | _linear("fc3", "score")
_CONSENSUS = (_linear("fc1", "concept_branch.0") | _batch_norm("embedding_1.1", "concept_branch.1")
              | _linear("fc2", "instance_branch.0") | _batch_norm("embedding_2.1", "instance_branch.1")
              | _linear("fc3", "score"))  # fmt: skip
# nn.Sequential(self.fcN, ...) registers fcN a second time: the same tensors under embedding_N.0
_ALIASES = {f"embedding_{n}.0.{tensor}": f"fc{n}.{tensor}" for n in (1, 2, 3) for tensor in ("weight", "bias")}
_VISUAL_UNUSED = {f"{layer}.{t}" for layer in ("fc2_2", "fc4", "embedding_2_2.0") for t in ("weight", "bias")}
_VISUAL_UNUSED |= {f"embedding_2_2.1.{tensor}" for tensor in BATCH_NORM}


def _mapped(
    path: Path, module: str, source: Mapping[str, Tensor], mapping: Mapping[str, str], prefix: str, *,
    aliases: Mapping[str, str] | None = None, unused: set[str] | None = None,
) -> dict[str, Tensor]:  # fmt: skip
    """`source`'s tensors under `prefix` + their names in `mapping`; an alias must hold its original's values, a
    tensor in none of the sets is refused. A missing tensor is left to `load_weights` to name (a BatchNorm's
    `num_batches_tracked`, which PyTorch before 0.4.1 did not save, becomes 0)."""
    aliases, unused = aliases or {}, unused or set()
    unexpected = sorted(set(source) - set(mapping) - set(aliases) - unused)
    if unexpected:
        raise UserError(f"{path}: {module} has tensors CVSE's {module} does not: {', '.join(unexpected)}")
    for alias, original in aliases.items():
        if alias in source and original in source and not torch.equal(source[alias], source[original]):
            raise UserError(f"{path}: {module}.{alias} differs from {module}.{original}, the same tensor in CVSE")
    state = {prefix + ours: source[key] for key, ours in mapping.items() if key in source}
    for key, ours in mapping.items():
        if key not in source and key.endswith("num_batches_tracked"):
            state[prefix + ours] = torch.tensor(0, dtype=torch.int64)
    return state


def _graph(path: Path, gcn: Mapping[str, Tensor], concepts: CvseConcepts) -> dict[str, Tensor]:
    """The GCN's weights, its graph normalised as CVSE's `gen_adj` does, and the concept inputs, under both encoders'
    names (one GCN serves both); the checkpoint's `adj_all` must be the graph the adjacency file gives."""
    expected = {"gc1.weight", "gc2.weight", "adj_all", "adj_O_P", "adj_O_M", "joint_att_emb.weight",
                "joint_att_emb.bias"}  # fmt: skip
    unexpected, missing = sorted(set(gcn) - expected), sorted({"gc1.weight", "gc2.weight", "adj_all"} - set(gcn))
    if unexpected or missing:
        problems = "; ".join(f"{label} {', '.join(keys)}" for label, keys in
                             (("unexpected", unexpected), ("missing", missing)) if keys)  # fmt: skip
        raise UserError(f"{path}: C_GCN is not CVSE's ({problems})")
    adjacency = gen_adj(gcn["adj_all"].float())
    from_file = concept_adjacency(concepts.as_concepts().cooccurrence, threshold=GRAPH["graph_threshold"],
                                  rescale_base=GRAPH["graph_rescale_base"], rescale_shift=GRAPH["graph_rescale_shift"],
                                  reweight=GRAPH["graph_reweight"])  # fmt: skip
    if adjacency.shape != from_file.shape or not torch.allclose(adjacency, from_file, atol=1e-5):
        raise UserError(f"{path}: its concept graph (C_GCN.adj_all, {tuple(adjacency.shape)}) is not the one the "
                        "adjacency file gives: not its concept files")  # fmt: skip
    graph = {"weight_hidden": gcn["gc1.weight"], "weight_out": gcn["gc2.weight"], "adjacency": adjacency,
             "inputs": torch.from_numpy(concepts.vectors)}  # fmt: skip
    return {f"{side}_encoder.graph.{key}": value for side in ("image", "text") for key, value in graph.items()}


def gen_adj(adjacency: Tensor) -> Tensor:
    """CVSE `util_C_GCN.gen_adj`: D^-½ Aᵀ D^-½ with D the row sums of A."""
    inverse_sqrt_degree = adjacency.sum(dim=1).pow(-0.5)
    return inverse_sqrt_degree[:, None] * adjacency.T * inverse_sqrt_degree[None, :]
