"""The one schema for `params.yaml`: frozen pydantic sections, unknown keys rejected, variants chosen by `kind`.

`load_params` reads `params.yaml` through `read_yaml` (profiles too), which refuses what PyYAML would let pass: text
that is not UTF-8, a key written twice. A mistake in the file becomes a `UserError` whose message has
one line per problem, each naming the YAML path, the bad value and what is allowed, e.g.

    params.yaml: datasets.synthetic.kind: 'synthetc' is not one of 'synthetic', 'flickr30k', 'coco'

Named blocks that hold one of several variants (`datasets:` now, `matchers:` later) are discriminated unions on
`kind`: the `kind` picks the schema that checks the rest of the block. Write floats with a decimal point
(`5.0e-4`, not `5e-4`): YAML 1.1 reads the latter as a string.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from itm.errors import UserError

PARAMS_FILE = Path("params.yaml")

# A block name doubles as a folder name (data/raw/<name>, models/<name>), so keep it filesystem- and DVC-safe.
BlockName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_\-]*$")]
Md5 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
# Every seed is handed to numpy and torch, whose common range is 0 <= seed < 2**32 (numpy's legacy seeding); derived
# seeds (seed * 100_003 + epoch, seed * 1000 + epoch) stay within torch's 64 bits from there.
SEED_MAX = 2**32 - 1
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
# The largest embedding or word vector: 8x the papers' 1024 (VSE++, SCAN, VSE∞). Far beyond it a typo allocates
# terabytes (a [vocabulary, word_dim] table, [batch, regions, embed_dim] activations) long after the params loaded.
MAX_DIM = 8192
# The largest learning rate, for Adam and for the detector's SGD alike: Adam moves every weight by about the learning
# rate per step, so above 1 a single step outweighs the unit-scale weights it updates (SGD detectors use 0.02 x
# batch / 16). Higher rates trained to exit 0 on a collapsed model; the shared defaults are 2e-4 (Adam), 0.02 (SGD).
MAX_LEARNING_RATE = 1.0
LearningRate = Annotated[float, Field(gt=0.0, le=MAX_LEARNING_RATE)]
Positive = Annotated[float, Field(gt=0.0)]


class Section(BaseModel):
    """Base of every params.yaml block: unknown keys are errors and values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Processes(Section):
    """How many processes a heavy stage runs as (itm/distributed.py): `gpus` per node x `nodes`. More than one
    and the stage re-launches itself under torchrun, one process per GPU (NCCL), or per CPU process over gloo on a
    machine without GPUs. Several nodes also need ITM_RDZV_ENDPOINT and ITM_RDZV_ID (README, "Several GPUs")."""

    gpus: int = Field(1, ge=1)  # processes per node
    nodes: int = Field(1, ge=1)


# --- datasets -------------------------------------------------------------------------------------------------------


class SplitSizes(Section):
    """Number of images per split."""

    train: int = Field(gt=0)
    val: int = Field(gt=0)
    test: int = Field(gt=0)


class SyntheticDataset(Section):
    """Generated scenes of coloured shapes with grammar captions: the offline default (see itm.data.synthetic)."""

    kind: Literal["synthetic"]
    seed: Seed = 0
    splits: SplitSizes = SplitSizes(train=3000, val=500, test=1000)
    image_size: int = Field(128, ge=64, le=1024)  # square images, pixels
    captions_per_image: int = Field(5, ge=1, le=20)
    min_objects: int = Field(2, ge=1, le=6)
    max_objects: int = Field(4, ge=1, le=6)
    # Share of scenes generated as a near-duplicate of the previous one: same objects, but one colour/shape
    # binding swapped or one spatial relation flipped, so only fine-grained matching tells them apart.
    twin_fraction: float = Field(0.5, ge=0.0, le=1.0)
    jpeg_quality: int = Field(92, ge=50, le=100)

    @model_validator(mode="after")
    def _object_range(self) -> SyntheticDataset:
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects ({self.min_objects}) must not exceed max_objects ({self.max_objects})")
        return self


class RemoteFile(Section):
    """A file to fetch: an http(s) URL or a local path, with the size and checksums to verify when known."""

    source: str | None = None
    size: int | None = Field(None, gt=0)  # bytes
    md5: Md5 | None = None
    sha256: Sha256 | None = None


class KarpathySplitFile(RemoteFile):
    """The Karpathy split JSON, either as a plain file or as a `member` of a zip archive."""

    member: str | None = None


class ImageArchive(RemoteFile):
    """A zip or tar archive of images. Members outside `strip_prefix` are ignored; the prefix is removed."""

    strip_prefix: str = ""


class KarpathyDataset(Section):
    """A real dataset in Karpathy splits: Flickr30K or MS-COCO 2014 (restval joins train)."""

    kind: Literal["flickr30k", "coco"]
    karpathy: KarpathySplitFile
    # With regions.source: precomp every archive's source may stay null: the download stage then fetches the
    # captions and splits only (the figures that need pixels are skipped).
    images: tuple[ImageArchive, ...] = Field(min_length=1)
    # Retrieval protocols use exactly 5 captions per image; COCO images with more keep their first 5.
    captions_per_image: int = Field(5, ge=1, le=20)


DatasetParams = Annotated[SyntheticDataset | KarpathyDataset, Field(discriminator="kind")]


# --- stages ---------------------------------------------------------------------------------------------------------


class DetectorArchitecture(Section):
    """The bottom-up Faster R-CNN. Defaults are the Visual Genome BUTD ResNet-101 (Anderson et al. 2018)."""

    blocks: tuple[int, int, int, int] = (3, 4, 23, 3)  # bottlenecks in res2..res5 (ResNet-101)
    width: int = Field(64, ge=4)  # res2 planes; stage s has width * 2**(s-2) planes and 4x that many outputs
    rpn_channels: int = Field(512, ge=1)
    anchor_scales: tuple[Positive, ...] = Field((4.0, 8.0, 16.0, 32.0), min_length=1)  # x 16 px
    anchor_ratios: tuple[Positive, ...] = Field((0.5, 1.0, 2.0), min_length=1)  # height / width
    pool_size: int = Field(14, ge=1)  # RoI max-pool resolution on res4
    class_embedding: int = Field(256, ge=1)
    attribute_hidden: int = Field(512, ge=1)
    # Attribute loss weight 0.5, as in detectron2 Visual Genome attribute training (lichengunc/detectron2).
    attribute_loss_weight: float = Field(0.5, ge=0.0)
    min_size: int = Field(600, ge=32)  # shorter image side at the network input
    max_size: int = Field(1000, ge=32)  # cap on the longer side
    rpn_pre_nms_train: int = Field(12000, ge=1)
    rpn_post_nms_train: int = Field(2000, ge=1)
    rpn_pre_nms_test: int = Field(6000, ge=1)
    rpn_post_nms_test: int = Field(300, ge=1)
    rpn_nms_threshold: float = Field(0.7, gt=0.0, le=1.0)
    roi_batch_per_image: int = Field(128, ge=1)  # sampled RoIs per image in training

    @property
    def feature_dim(self) -> int:
        return self.width * 32

    @model_validator(mode="after")
    def _sizes_in_order(self) -> DetectorArchitecture:
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) must not exceed max_size ({self.max_size})")
        return self


class DetectorTraining(Section):
    """Training the detector from scratch on the synthetic boxes (SGD with warm-up and step decay)."""

    epochs: int = Field(6, ge=1)
    batch_size: int = Field(8, ge=1)
    learning_rate: LearningRate = 0.02  # at most MAX_LEARNING_RATE
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1.0e-4, ge=0.0)
    warmup_iterations: int = Field(100, ge=0)
    # Fractions of training (strictly between 0 and 1) after which the learning rate drops 10x; [] for none.
    decay_at: tuple[Annotated[float, Field(gt=0.0, lt=1.0)], ...] = (0.75,)
    max_images: int | None = Field(None, ge=1)  # train on at most this many train images (None: all)
    seed: Seed = 0


class PretrainedDetector(Section):
    """Published BUTD weights to convert: a detectron2-format pickle or a MILVLG `.pth`."""

    source: str | None = None  # path or http(s) URL
    sha256: Sha256 | None = None  # required: a file with another checksum is refused
    layout: Literal["detectron2", "milvlg"] = "detectron2"
    # Visual Genome vocabularies (objects_vocab.txt: 1600 lines, attributes_vocab.txt: 400), for the card.
    objects_vocab: RemoteFile = RemoteFile()
    attributes_vocab: RemoteFile = RemoteFile()


class DetectorParams(Section):
    """Where the bottom-up detector comes from: trained here, converted from published weights, or none."""

    weights: Literal["train", "pretrained", "none"] = "train"
    architectures: dict[BlockName, DetectorArchitecture] = Field(
        default_factory=lambda: {"butd": DetectorArchitecture()}
    )
    # The key of `architectures` to build. Required: left out, it would fall back to the ResNet-101 BUTD, hours of
    # training on a CPU.
    architecture: BlockName
    train: DetectorTraining = DetectorTraining()
    pretrained: PretrainedDetector = PretrainedDetector()

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, value: str, info: Any) -> str:
        known = info.data.get("architectures")
        if known is not None and value not in known:
            raise ValueError(f"{value!r} is not a key of detector.architectures ({_choices(known)})")
        return value

    @property
    def active_architecture(self) -> DetectorArchitecture:
        return self.architectures[self.architecture]

    @model_validator(mode="after")
    def _pretrained_complete(self) -> DetectorParams:
        if self.weights == "pretrained":
            missing = [key for key in ("source", "sha256") if getattr(self.pretrained, key) is None]
            if missing:
                raise ValueError(f"weights is 'pretrained' but pretrained.{missing[0]} is not set")
        return self


class RegionParams(Processes):
    """Bottom-up regions: Caffe-style selection from the detector, or SCAN's precomputed features."""

    source: Literal["detector", "precomp"] = "detector"
    # Selection of tools/generate_tsv.py: per-class NMS, a confidence threshold, then 10..100 boxes (36/36 also used).
    min_boxes: int = Field(10, ge=1)
    max_boxes: int = Field(100, ge=1)
    confidence_threshold: float = Field(0.2, ge=0.0, le=1.0)
    nms_threshold: float = Field(0.3, gt=0.0, le=1.0)
    batch_size: int = Field(4, ge=1)  # images per forward pass (padding differs with batch composition)
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    # source: precomp: SCAN's data/<f30k|coco>_precomp/ ({split}_ims.npy, _caps.txt, _ids.txt), or VSE∞'s
    # data/<f30k|coco>/ (the same files in precomp/, id_mapping.json beside it) or its precomp/ (itm/data/precomp.py)
    precomp_dir: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> RegionParams:
        if self.min_boxes > self.max_boxes:
            raise ValueError(f"min_boxes ({self.min_boxes}) must not exceed max_boxes ({self.max_boxes})")
        if self.source == "precomp" and self.precomp_dir is None:
            raise ValueError("source is 'precomp' but precomp_dir is not set")
        return self


class DownloadParams(Section):
    """How HTTP downloads behave."""

    retries: int = Field(5, ge=0, le=50)  # further attempts after the first
    backoff_seconds: float = Field(2.0, ge=0.0)  # wait before retry n is backoff_seconds * 2**(n-1)
    timeout_seconds: float = Field(60.0, gt=0.0)  # per connection attempt and per read


class ConceptParams(Section):
    """The CVSE concept vocabulary: the most frequent content words of the train captions."""

    top_k: int = Field(300, gt=0)
    # Function words are left out so that concepts are (mostly) nouns, adjectives and verbs.
    stop_words: Literal["english", "none"] = "english"


class TokenizeParams(Section):
    """Captions to token ids."""

    min_count: int = Field(4, ge=1)  # train-caption occurrences for a word to enter the vocabulary (SCAN: 4)
    concepts: ConceptParams = ConceptParams()


# --- matchers, training, evaluation --------------------------------------------------------------------------------


class PublishedConcepts(Section):
    """The concept files a CVSE checkpoint was trained with (BruceW91/CVSE
    `data/<data>_annotations/Concept_annotations*/`), in the order of its concept ids."""

    categories: RemoteFile  # category_concepts.json: {concept word: id}, ids 0..K-1 in file order
    adjacency: RemoteFile  # <data>_adj_concepts.pkl: concept counts `nums` and co-occurrences `adj_all`
    word_vectors: RemoteFile  # <data>_concepts_glove_word2vec.pkl: [K, 300] GloVe vectors, the GCN's inputs
    # how a caption's words become its concepts: wordnet, CVSE's (each word and concept word reduced to its WordNet
    # noun lemma; needs WordNet 3.0's database: Debian's wordnet-base, or WNSEARCHDIR); exact: the words as they are
    # (not CVSE's protocol; for machines without WordNet)
    lemmas: Literal["wordnet", "exact"] = "wordnet"

    @model_validator(mode="after")
    def _sources_named(self) -> PublishedConcepts:
        unnamed = [name for name in ("categories", "adjacency", "word_vectors") if getattr(self, name).source is None]
        if unnamed:
            raise ValueError(f"{', '.join(f'{name}.source' for name in unnamed)} not set: CVSE's concepts are its own")
        return self


class PublishedWeights(Section):
    """A released checkpoint to convert instead of training (`train@` converts it; itm/train/published/).

    `scan`: kuanghuei/SCAN's `model_best.pth.tar` with the vocabulary it was trained with (`vocab`: SCAN's
    `vocab/<data>_precomp_vocab.json`, or the `.pkl` CVSE ships). The checkpoint's options decide the matcher's
    direction, pooling, lambdas and sizes; a key the block sets must agree with them.
    `cvse`: BruceW91/CVSE's `model_best.pth.tar`, its vocabulary (`vocab/<data>_precomp_vocab.pkl`) and its
    `concepts` files; the matcher gets CVSE's layout (`region_norm: slots`, `caption_concepts: words`).
    `vse_infty`: woodfrog/vse_infty's `model_best.pth` of a BUTD-region + bi-GRU model (branch bigru) with SCAN's
    JSON vocabulary it was trained with (VSE∞ appends <mask> itself)."""

    source: str  # path or http(s) URL of the checkpoint
    sha256: Sha256  # a file with another checksum is refused
    layout: Literal["scan", "cvse", "vse_infty"]
    vocab: RemoteFile  # the vocabulary file the checkpoint's word ids refer to
    concepts: PublishedConcepts | None = None  # layout cvse: its concept files; null otherwise

    @model_validator(mode="after")
    def _vocab_named(self) -> PublishedWeights:
        if self.vocab.source is None:
            raise ValueError("vocab.source is not set: a checkpoint's word ids mean nothing without its vocabulary")
        if self.layout == "cvse" and self.concepts is None:
            raise ValueError("layout cvse needs `concepts` (categories, adjacency, word_vectors): CVSE's own files")
        if self.layout != "cvse" and self.concepts is not None:
            raise ValueError(f"`concepts` belong to layout cvse; a {self.layout} checkpoint has none")
        return self


class MatcherCommon(Section):
    """What every matcher has: a joint embedding space, word embeddings and the hinge triplet loss; or, instead of
    training, published weights to convert (`weights`)."""

    embed_dim: int = Field(1024, ge=1, le=MAX_DIM)  # joint space (VSE++, SCAN: 1024)
    word_dim: int = Field(300, ge=1, le=MAX_DIM)  # word embeddings (300)
    margin: float = Field(0.2, ge=0.0)  # hinge margin alpha (VSE++, SCAN: 0.2)
    max_violation: bool = True  # hardest negative in the batch (VSE++); false sums over all negatives (VSE0)
    # This matcher's own training recipe where it differs from the shared `train:` block; null: train's value.
    max_epochs: int | None = Field(None, ge=1)  # the epoch cap (training stops earlier on a validation plateau)
    schedule: Literal["step", "cosine"] | None = None  # learning-rate schedule
    learning_rate: LearningRate | None = None  # at most MAX_LEARNING_RATE
    decay_epochs: int | None = Field(None, ge=1)  # step schedule: x0.1 every this many epochs
    warmup_epochs: int | None = Field(None, ge=0)  # hinge losses: epochs on all violations before the hardest one
    optimizer: Literal["adam", "adamw"] | None = None
    weight_decay: float | None = Field(None, ge=0.0)
    weights: PublishedWeights | None = None  # released weights to convert instead of training; null: train

    @model_validator(mode="after")
    def _layout_of_kind(self) -> MatcherCommon:
        kind = getattr(self, "kind", None)
        if self.weights is not None and self.weights.layout != kind:
            raise ValueError(f"weights.layout {self.weights.layout!r} does not build a {kind!r} matcher")
        return self


class VseppParams(MatcherCommon):
    """VSE++ (Faghri et al., BMVC 2018): mean-pooled regions vs the GRU's last state, cosine similarity."""

    kind: Literal["vsepp"]
    bidirectional: bool = False  # VSE++ uses a unidirectional GRU


# SCAN's Flickr30K settings per direction (Lee et al. ECCV 2018, Table 1 and kuanghuei/SCAN README; methods.md §2.2):
# lambda_1 (attention inverse temperature) and lambda_2 (LogSumExp pooling). COCO's i-t LSE uses lambda_2 = 20.
SCAN_LAMBDAS = {"t2i": {"lambda_softmax": 9.0, "lambda_lse": 6.0}, "i2t": {"lambda_softmax": 4.0, "lambda_lse": 5.0}}


class ScanParams(MatcherCommon):
    """SCAN (Lee et al., ECCV 2018): stacked cross attention. Defaults: the paper's Flickr30K t-i AVG model; a
    lambda left out takes the paper's value for the block's direction (SCAN_LAMBDAS)."""

    kind: Literal["scan"]
    direction: Literal["t2i", "i2t"] = "t2i"  # t2i: words attend to regions; i2t: regions attend to words
    pooling: Literal["avg", "lse"] = "avg"
    lambda_softmax: float = Field(9.0, gt=0.0)  # lambda_1, attention inverse temperature (t-i 9, i-t 4)
    lambda_lse: float = Field(6.0, gt=0.0)  # lambda_2 of LogSumExp pooling (t-i 6, i-t 5; COCO i-t 20)
    bidirectional: bool = True  # bi-GRU, directions averaged

    @model_validator(mode="before")
    @classmethod
    def _lambdas_of_direction(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("direction") in SCAN_LAMBDAS:
            data = SCAN_LAMBDAS[data["direction"]] | data
        return data


class UardaParams(MatcherCommon):
    """UARDA (Zhang et al., IEEE TMM 2022): SCAN t-i with a learned word-region relevance threshold.

    The paper's full text is not available; this follows its abstract and the estimator of NAAF (same authors,
    CVPR 2022): the threshold sits where the alpha-weighted Gaussians of relevant (matched) and irrelevant
    (unmatched) word-region similarities cross, updated by moving average during training.
    """

    kind: Literal["uarda"]
    pooling: Literal["avg", "lse"] = "avg"
    lambda_softmax: float = Field(9.0, gt=0.0)
    lambda_lse: float = Field(6.0, gt=0.0)
    bidirectional: bool = True
    threshold_estimator: Literal["gaussian", "fixed"] = "gaussian"  # fixed: stays at threshold_init (SCAN's 0)
    threshold_init: float = Field(0.0, ge=-1.0, le=1.0)
    threshold_alpha: float = Field(2.0, gt=0.0)  # weight of the irrelevant Gaussian: larger raises t (NAAF: 2.0)
    threshold_momentum: float = Field(0.7, ge=0.0, le=1.0)  # weight of the new estimate (NAAF: 0.7)
    threshold_min_samples: int = Field(200, ge=2)  # words per side before an estimate (NAAF: 200)
    skip_queries: bool = True  # at retrieval, skip words whose best region similarity is below the threshold


class NaafParams(MatcherCommon):
    """NAAF (Zhang et al., CVPR 2022): SCAN's encoders, t-i scores with a negative term and two positive terms around
    a threshold estimated per training batch. Defaults: CrossmodalGroup/NAAF `train.py`, `model.py` and its README's
    Flickr30K flags (itm/models/naaf.py)."""

    kind: Literal["naaf"]
    max_epochs: int | None = Field(20, ge=1)  # NAAF --num_epochs 20
    schedule: Literal["step", "cosine"] | None = "step"
    learning_rate: LearningRate | None = 5.0e-4  # NAAF --learning_rate .0005
    decay_epochs: int | None = Field(10, ge=1)  # NAAF README --lr_update 10 (train.py's default: 20)
    warmup_epochs: int | None = Field(0, ge=0)  # NAAF takes the hardest negative from the first step
    bidirectional: bool = True  # NAAF's GRU is bidirectional, directions averaged
    lambda_softmax: float = Field(20.0, gt=0.0)  # λ of both attentions
    threshold_alpha: float = Field(2.0, gt=0.0)  # weight of the unmatched Gaussian: larger raises t (NAAF --alpha)
    threshold_momentum: float = Field(0.7, ge=0.0, le=1.0)  # weight of a new estimate
    threshold_min_words: int = Field(200, ge=2)  # matched words a batch pools before an estimate
    safe_threshold_stds: float = Field(3.0, ge=0.0)  # retrieval threshold: mean - this x std of the matched pool
    intra_lambda: float | None = Field(5.0, gt=0.0)  # retrieval: smooth the negative indicator over the caption's
    # words with softmax(intra_lambda e_j.e_k) (NAAF intra_relation); null: each word's own
    # per_caption: NAAF's updates inside the scoring of a batch (one process); per_batch: after it (any processes)
    threshold_schedule: Literal["per_caption", "per_batch"] = "per_caption"


class CvseParams(MatcherCommon):
    """CVSE (Wang et al., ECCV 2020): instance embeddings from memory-guided attention, consensus embeddings from a
    GCN over a concept co-occurrence graph, fused. Defaults: BruceW91/CVSE `train_f30k.py` and `model_CVSE.py`
    (methods.md §2.4)."""

    kind: Literal["cvse"]
    bidirectional: bool = True  # bi-GRU, directions averaged
    dropout: float = Field(0.4, ge=0.0, lt=1.0)  # on word embeddings and in the attention branches (CVSE 0.4)
    # the concept graph (CVSE `gen_A_concept`, mode 'Complex'): P(c_j | c_i) rescaled, binarised at tau
    graph_threshold: float = Field(0.3, ge=0.0)  # tau
    graph_rescale_base: float = Field(5.0, gt=1.0)  # t of f(x) = t^(x - p) - t^(-p)
    graph_rescale_shift: float = Field(0.02, ge=0.0)  # p
    graph_reweight: float = Field(0.25, gt=0.0)  # neighbours' share of a column before the self-loop
    concept_input_dim: int = Field(300, ge=1)  # GCN input size (GloVe 300-d in CVSE)
    glove_path: str | None = None  # GloVe text file for the concept inputs; null: random inputs
    label_ratio: float = Field(0.35, ge=0.0, le=1.0)  # beta: ground-truth share of the textual concept scores
    concept_smoothing: float = Field(10.0, gt=0.0)  # softmax sharpness of concept scores and labels (CVSE 10)
    fusion: Literal["weight_sum", "concat", "adap_sum"] = "weight_sum"
    fusion_alpha: float = Field(0.85, ge=0.0, le=1.0)  # weight_sum: instance share in training (CVSE 0.85)
    fusion_alpha_test: float | None = Field(None, ge=0.0, le=1.0)  # at retrieval; null: fusion_alpha (COCO: 0.9)
    # ranking losses on the fused, instance and consensus embeddings, and the KL term (CVSE [3, 5, 1, 2])
    loss_weights: tuple[float, float, float, float] = (3.0, 5.0, 1.0, 2.0)
    loss_weighting: Literal["fixed", "dwa"] = "fixed"  # dwa: re-weighted each epoch from the losses' own descent
    dwa_temperature: float = Field(2.0, gt=0.0)  # T of Dynamic Weight Average (Liu et al., CVPR 2019)
    fused_score_weight: float = Field(0.95, ge=0.0, le=1.0)  # retrieval: S = w cos(fused) + (1 - w) cos(consensus)
    # the visual attention's BatchNorm: over the real regions' features (any region count), or CVSE's
    # BatchNorm1d over `region_slots` region slots (every image needs exactly that many regions; cvse only)
    region_norm: Literal["features", "slots"] = "features"
    region_slots: int = Field(36, ge=1)  # slots: regions per image (CVSE: 36)
    # a caption's concepts: labels, the data's (tokenize's concept labels); words, its word ids looked up in the
    # model's own word -> concept table (a converted CVSE checkpoint's: CVSE labels test captions by their words);
    # words reads no labels, so it cannot train nor complete labels transductively
    caption_concepts: Literal["labels", "words"] = "labels"

    @model_validator(mode="after")
    def _cvse_layout(self) -> CvseParams:
        if self.region_norm == "slots" and self.kind != "cvse":
            raise ValueError(f"region_norm 'slots' is CVSE's visual BatchNorm; {self.kind} has none")
        if self.caption_concepts == "words" and self.weights is None:
            raise ValueError("caption_concepts 'words' reads a converted checkpoint's word -> concept table; "
                             "it needs `weights` (to train, use 'labels')")  # fmt: skip
        return self


class MhCvseParams(CvseParams):
    """MH-CVSE (Chen, arXiv 2412.19184): CVSE with multi-head attention for the instance embeddings, dynamic loss
    weights and cosine annealing. The paper's full text was not available; choices are documented in
    itm/models/cvse.py."""

    kind: Literal["mh_cvse"]
    heads: int = Field(8, ge=1)
    loss_weighting: Literal["fixed", "dwa"] = "dwa"
    schedule: Literal["step", "cosine"] | None = "cosine"

    @model_validator(mode="after")
    def _heads_divide_embedding(self) -> MhCvseParams:
        if self.embed_dim % self.heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be a multiple of heads ({self.heads})")
        return self


class MvamParams(MatcherCommon):
    """MVAM (Cui et al., arXiv 2402.17237): multi-view attention pooling on a two-stream matcher; retrieval stays
    one dot product. The paper's full text was not available; choices are documented in itm/models/mvam.py."""

    kind: Literal["mvam"]
    bidirectional: bool = True  # bi-GRU, directions averaged
    views: int = Field(16, ge=1)  # m: view codes per modality (the paper's visualisation shows 16)
    view_dim: int | None = Field(None, ge=2, le=MAX_DIM)  # size of one view; null: embed_dim // views (any m)
    diversity: Literal["full", "off_diagonal"] = "full"  # ||A A^T - I||^2, or its off-diagonal entries only
    diversity_weight: float = Field(0.1, ge=0.0)
    objective: Literal["infonce", "hinge"] = "infonce"  # symmetric InfoNCE (two-stream convention) or VSE++ hinge
    temperature_init: float = Field(0.07, gt=0.0)  # InfoNCE: the learnable logit scale starts at 1 / this (CLIP)
    max_logit_scale: float = Field(100.0, gt=0.0)  # InfoNCE: the logit scale is clamped here (CLIP)
    # own: projected bottom-up regions and bi-GRU words; open_clip: an open_clip model's vision tokens (of the
    # image pixels, data/raw/<dataset>/images) and text tokens (its own tokenizer)
    backbone: Literal["own", "open_clip"] = "own"
    clip_model: str = "ViT-B-32"  # an open_clip model name (open_clip.list_models()), or clip_config's file stem
    clip_config: str | None = None  # a JSON model config file to register first (e.g. a small custom model)
    clip_checkpoint: str | None = None  # local weights for clip_model; null: random initialisation

    @model_validator(mode="after")
    def _views_fit(self) -> MvamParams:
        # A one-dimensional view normalised to unit length is a sign, ±1: every score is the same constant.
        if self.view_dim is None and self.embed_dim < 2 * self.views:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) // views ({self.views}) leaves views of fewer than 2 dimensions (a unit "
                "vector of one dimension is ±1, so every score would be the same): lower views or set view_dim"
            )
        return self


class VseInftyParams(MatcherCommon):
    """VSE∞ (Chen et al., CVPR 2021): regions (fc + MLP) and bi-GRU words, each pooled by the Generalized Pooling
    Operator; cosine similarity. Defaults: woodfrog/vse_infty branch bigru (`lib/encoders.py`, `gpo.py`,
    `train_region.sh`: learning rate 5e-4, decayed x0.1 at epoch 15, one warmup epoch on all violations)."""

    kind: Literal["vse_infty"]
    bidirectional: bool = True  # bi-GRU, directions averaged
    gpo_pe_dim: int = Field(32, ge=2, multiple_of=2)  # GPO position encoding size (VSE∞: GPO(32, 32))
    gpo_hidden_dim: int = Field(32, ge=1)  # GPO's bi-GRU state size
    region_drop: float = Field(0.2, ge=0.0, lt=1.0)  # training: each region dropped with this probability (0.2)
    word_augment: float = Field(0.2, ge=0.0, le=1.0)  # training: each token masked / replaced / deleted (0.2)
    # training: the region MLP's BatchNorm statistics over every row of the padded batch (VSE∞'s code) or over the
    # real regions only (independent of the batch's padding); evaluation uses the running statistics either way
    batchnorm_rows: Literal["padded", "regions"] = "padded"
    learning_rate: LearningRate | None = 5.0e-4
    decay_epochs: int | None = Field(15, ge=1)  # lr_update
    warmup_epochs: int | None = Field(1, ge=0)  # vse_mean_warmup_epochs
    optimizer: Literal["adam", "adamw"] | None = "adamw"  # torch.optim.AdamW with its default weight decay
    weight_decay: float | None = Field(0.01, ge=0.0)


MatcherParams = Annotated[
    VseppParams | ScanParams | UardaParams | CvseParams | MhCvseParams | MvamParams | VseInftyParams | NaafParams,
    Field(discriminator="kind"),
]


class TrainParams(Processes):
    """One training protocol for every matcher: the optimizer, schedule, warm-up and early stopping on validation rSum
    (a matcher block may override the recipe keys, `OWN_SETTINGS` in itm/train/run.py)."""

    max_epochs: int = Field(30, ge=1)  # the cap; training stops earlier when validation rSum plateaus (`patience`)
    # At most this many epochs for every matcher, whatever its own max_epochs (one knob for a quick run); null: none.
    epoch_limit: int | None = Field(None, ge=1)
    # Early stopping: stop after `patience` epochs in a row without a validation rSum above the best by more than
    # `min_delta`; null: train to max_epochs. The best epoch's weights are kept either way.
    patience: int | None = Field(3, ge=1)
    min_delta: float = Field(0.0, ge=0.0)  # rSum points
    # Hinge losses (VSE++, SCAN, ...): the first `warmup_epochs` epochs sum the violations of every negative, then
    # the hardest negative alone (VSE∞'s `vse_mean_warmup_epochs`); 0: the hardest negative from the first step.
    warmup_epochs: int = Field(0, ge=0)
    batch_size: int = Field(128, ge=2)  # global: split evenly over the processes, hardest negatives over all of it
    learning_rate: LearningRate = 2.0e-4  # at most MAX_LEARNING_RATE
    optimizer: Literal["adam", "adamw"] = "adam"  # adam (SCAN, VSE++, CVSE) | adamw (decoupled decay; VSE∞)
    weight_decay: float = Field(0.0, ge=0.0)  # adam: an L2 penalty in the gradient; adamw: decoupled decay
    schedule: Literal["step", "cosine"] = "step"  # cosine anneals over max_epochs
    decay_epochs: int = Field(15, ge=1)  # step: learning rate x0.1 every decay_epochs (SCAN lr_update)
    grad_clip: float = Field(2.0, gt=0.0)  # max gradient norm
    # Autocast on a GPU (the CPU always trains in fp32): bf16 needs no loss scaling; fp16 uses a GradScaler.
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    # Length-bucketed batches: > 0 sorts each run of `bucket_batches` shuffled global batches by caption length
    # before cutting it into batches (less padding, but negatives of similar length); 0 keeps batches random.
    bucket_batches: int = Field(0, ge=0)
    # Each seed trains (and evaluates) every matcher once, as its own DVC stage (`train@<matcher>-<seed>`); the
    # comparison reports the mean and standard deviation over seeds. The seed fixes initialisation and batch order.
    seeds: tuple[Seed, ...] = Field((0,), min_length=1)

    @model_validator(mode="after")
    def _batch_splits_evenly(self) -> TrainParams:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {list(self.seeds)} repeat a seed; each seed is one training run")
        processes = self.gpus * self.nodes
        if self.batch_size % processes or self.batch_size // processes < 2:
            raise ValueError(
                f"batch_size {self.batch_size} must split evenly into batches of at least 2 over gpus x nodes = "
                f"{processes} processes"
            )
        return self


class BootstrapParams(Section):
    """Percentile bootstrap intervals of every R@K and rSum in the metrics files (itm/evaluate/statistics.py): the
    test queries resampled with replacement, within each fold of a several-fold protocol."""

    resamples: int = Field(1000, ge=100)  # replicates per interval (fewer cannot place the tails of a 95 % interval)
    confidence: float = Field(0.95, gt=0, lt=1)
    seed: Seed = 0  # the resampled queries: the same for every model


class EvaluateParams(Processes):
    """Retrieval evaluation: the protocol follows the dataset; ensembles average similarity matrices."""

    # name -> matchers whose similarity matrices are averaged (SCAN's t-i AVG + i-t LSE ensemble)
    ensembles: dict[BlockName, tuple[BlockName, ...]] = Field(default_factory=dict)
    # Concept-aware matchers (CVSE, MH-CVSE) read each test caption's concepts from its own words. CVSE's public
    # evaluation also adds the concepts of neighbouring test captions (transductive: it uses the other queries);
    # true reproduces that (itm/evaluate/completion.py; CVSE's Flickr30K or COCO rule by dataset kind, the synthetic
    # set taking Flickr30K's), and the metrics record which was used.
    transductive_concepts: bool = False
    completion_text_neighbours: int = Field(10, ge=1)  # nearest other test captions by fused embedding (CVSE: 10)
    completion_image_window: int = Field(3, ge=1)  # captions around the query in its best image's ranking (CVSE: 3)
    # Autocast of the scoring on a GPU (the CPU scores in fp32). bench/precision.py compares it with fp32: reduced
    # precision reorders near-tied scores (VSE++ on the synthetic test: rSum -6.6 in fp16, -38.8 in bf16).
    precision: Literal["bf16", "fp16", "fp32"] = "fp32"
    bootstrap: BootstrapParams = BootstrapParams()


class SignificanceParams(Section):
    """The comparison's pairwise tests of rSum and its groups (itm/evaluate/statistics.py): a paired bootstrap over
    the same resampled test queries, p-values adjusted over all pairs of a protocol."""

    alpha: float = Field(0.05, gt=0, lt=1)  # a pair differs when its adjusted p-value is at most alpha
    # The smallest p-value is 2 / (resamples + 1); Holm over m pairs needs resamples >= 2m / alpha - 1 (1,119 for the
    # 28 pairs of 8 models), so 10,000 leaves room for 15 models.
    resamples: int = Field(10000, ge=100)
    seed: Seed = 0
    correction: Literal["holm", "bonferroni", "none"] = "holm"  # over all pairs of a protocol


class CompareParams(Section):
    """The comparison report (itm/report.py, itm/figures/): which test examples its figures show, and how models are
    told apart."""

    examples: int = Field(3, ge=1, le=10)  # test pairs per attention figure; queries per retrieval direction
    top: int = Field(5, ge=1, le=10)  # results shown per retrieval example
    seed: Seed = 0  # picks the example pairs and queries: the same ones for every matcher
    significance: SignificanceParams = SignificanceParams()


class Params(Section):
    """The whole of params.yaml. Every section is required: one left out (a bad merge, a deleted block) is an error,
    not a silent switch to the schema's defaults, which are the papers' full-size settings (the ResNet-101 detector,
    30 epochs of batch 128)."""

    datasets: dict[BlockName, DatasetParams] = Field(min_length=1)
    dataset: BlockName  # the key of `datasets` the pipeline runs on
    download: DownloadParams
    detector: DetectorParams
    regions: RegionParams
    tokenize: TokenizeParams
    matchers: dict[BlockName, MatcherParams]
    train: TrainParams
    evaluate: EvaluateParams
    compare: CompareParams

    @model_validator(mode="after")
    def _ensembles_name_matchers(self) -> Params:
        for name, members in self.evaluate.ensembles.items():
            if name in self.matchers:
                raise ValueError(
                    f"evaluate.ensembles.{name}: the name is taken by a matcher (both write metrics/{name}.json)"
                )
            unknown = [member for member in members if member not in self.matchers]
            if unknown:
                raise ValueError(
                    f"evaluate.ensembles.{name}: {unknown[0]!r} is not a key of matchers ({_choices(self.matchers)})"
                )
            if len(members) < 2:
                raise ValueError(f"evaluate.ensembles.{name}: an ensemble needs at least two matchers")
        return self

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str, info: Any) -> str:
        known = info.data.get("datasets")
        if known is not None and value not in known:
            raise ValueError(f"{value!r} is not a key of datasets ({_choices(known)})")
        return value

    @property
    def active_dataset(self) -> SyntheticDataset | KarpathyDataset:
        return self.datasets[self.dataset]


# --- loading and error messages -------------------------------------------------------------------------------------


def load_params(path: Path = PARAMS_FILE) -> Params:
    """Read and validate `path`; any problem raises a `UserError` with one line per mistake."""
    return parse_params(read_yaml(path), source=str(path))


def read_yaml(path: Path, what: str = "file") -> Any:
    """The YAML document of `path` (params.yaml, a profile), as plain data. A file that is missing, unreadable, not
    UTF-8, not YAML, or that repeats a key in a mapping raises a one-line `UserError` naming `path` (`what` it is).

    Duplicate keys are refused because the two readers of params.yaml disagree on them: PyYAML keeps the last value
    silently (a stage run directly would use it), DVC refuses the file.
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except OSError as error:
        raise UserError(f"{path}: cannot be read ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        line = error.object.count(b"\n", 0, error.start) + 1
        raise UserError(
            f"{path}: not UTF-8 text (byte 0x{error.object[error.start]:02x} on line {line}); save it as UTF-8"
        ) from None
    try:
        return _parse_unique_keys(text, path)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"{path}: invalid YAML{where}: {problem}") from None


def _parse_unique_keys(text: str, path: Path) -> Any:
    """`yaml.safe_load(text)`, after checking the document's node tree for a key repeated in one mapping."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:  # an empty document
            return None
        duplicate = _first_duplicate_key(node, "", set())
        if duplicate is not None:
            key, first, again = duplicate
            raise UserError(
                f"{path}: line {again.line + 1}: duplicate key {key} (first at line {first.line + 1}); keep one "
                "(DVC refuses the file)"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _first_duplicate_key(node: yaml.Node, prefix: str, seen: set[int]) -> tuple[str, yaml.Mark, yaml.Mark] | None:
    """(dotted key, first mark, repeated mark) of the first key, in file order, written twice in one mapping under
    `node`; `seen` holds the nodes already walked (an alias points back to its anchor, possibly inside itself)."""
    if id(node) in seen or not isinstance(node, yaml.CollectionNode):
        return None
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        items = [(f"{prefix}[{index}]", None, child) for index, child in enumerate(node.value)]
    else:
        items = [(_dotted(prefix, key), key, value) for key, value in node.value]
    marks: dict[str, yaml.Mark] = {}
    for path, key, child in items:
        # a scalar key, compared as written; `<<: *base` merges keys that the mapping may then override
        if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
            if key.value in marks:
                return path, marks[key.value], key.start_mark
            marks[key.value] = key.start_mark
        found = _first_duplicate_key(child, path, seen)
        if found is not None:
            return found
    return None


def _dotted(prefix: str, key: yaml.Node) -> str:
    name = key.value if isinstance(key, yaml.ScalarNode) else "?"
    return f"{prefix}.{name}" if prefix else name


def parse_params(raw: Any, source: str = str(PARAMS_FILE)) -> Params:
    """Validate an already-parsed params document."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        lines = [f"{source}: {line}" for line in describe_errors(error, Params)]
        raise UserError("\n".join(lines)) from None


def describe_errors(error: ValidationError, root: type[BaseModel]) -> list[str]:
    """One self-contained line per pydantic error: YAML path, bad value, allowed values."""
    return [_describe(detail, root) for detail in error.errors(include_url=False)]


def _describe(detail: Any, root: type[BaseModel]) -> str:
    loc = detail["loc"]
    kind, ctx, value = detail["type"], detail.get("ctx", {}), detail.get("input")
    if loc and loc[-1] == "[key]":  # a dict key (e.g. a dataset name) is invalid, not a value
        path, _, _ = _resolve(root, loc[:-2])
        return f"{path}: key {value!r} must match {ctx.get('pattern', 'the allowed pattern')}"
    if kind == "missing" and loc and isinstance(loc[-1], int):  # a fixed-length list that is too short
        path, _, leaf = _resolve(root, loc[:-1])
        return f"{path}: expected {len(typing.get_args(leaf))} items, got {value!r}"
    path, parent, leaf = _resolve(root, loc)
    if kind == "extra_forbidden":
        allowed = list(parent.model_fields) if _is_model(parent) else []
        return f"{path}: unknown key (allowed: {', '.join(allowed)})"
    if kind == "missing":
        return f"{path}: required {'section' if _is_section(leaf) else 'key'} is missing"
    if kind == "literal_error":
        return f"{path}: {value!r} is not one of {ctx['expected'].replace(' or ', ', ')}"
    if kind == "union_tag_invalid":
        return f"{path}.{_strip_quotes(ctx['discriminator'])}: {ctx['tag']!r} is not one of {ctx['expected_tags']}"
    if kind == "union_tag_not_found":
        tags = ", ".join(repr(tag) for tag in _union_tags(leaf))
        return f"{path}: missing key {ctx['discriminator']} that selects the variant (one of {tags})"
    if kind in _BOUNDS:
        return f"{path}: must be {_BOUNDS[kind]} {next(iter(ctx.values()))}, got {value!r}"
    if kind == "too_short":
        return f"{path}: needs at least {ctx['min_length']} item(s), got {value!r}"
    if kind == "too_long":
        return f"{path}: allows at most {ctx['max_length']} item(s), got {value!r}"
    if kind in _EXPECTED:
        return f"{path}: expected {_EXPECTED[kind]}, got {value!r}"
    if kind == "string_pattern_mismatch":
        return f"{path}: {value!r} does not match the pattern {ctx['pattern']}"
    if kind == "value_error" and not loc:  # a whole-file check names its own keys
        return str(ctx.get("error", detail["msg"]))
    if kind == "value_error":
        return f"{path}: {ctx.get('error', detail['msg'])}"
    message = detail["msg"][0].lower() + detail["msg"][1:]
    return f"{path}: {message}, got {value!r}"


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "tuple_type": "a list",
    "list_type": "a list",
}


def _resolve(root: type[BaseModel], loc: tuple[Any, ...]) -> tuple[str, Any, Any]:
    """The dotted YAML path of `loc` (without pydantic's union-tag steps), the type holding its last key, and the
    type at `loc` itself."""
    path = ""
    annotation: Any = root
    parent: Any = root
    for key in loc:
        parent = annotation = _unwrap(annotation)
        member = _union_member(annotation, key)
        if member is not None:  # pydantic inserts the discriminator tag into the location: not a YAML key
            annotation = member
            continue
        if isinstance(key, int):
            path += f"[{key}]"
        else:
            path += f".{key}" if path else str(key)
        annotation = _child(annotation, key)
    return path or "(top level)", _unwrap(parent), _unwrap(annotation)


def _unwrap(annotation: Any) -> Any:
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _is_section(annotation: Any) -> bool:
    """A block of keys (a schema or a mapping of named blocks), not a single value."""
    return _is_model(annotation) or typing.get_origin(annotation) is dict


def _variants(annotation: Any) -> dict[str, Any]:
    """`kind` tag -> schema, for a discriminated union; empty for anything else."""
    if typing.get_origin(annotation) not in (Union, types.UnionType):
        return {}
    variants = {}
    for member in map(_unwrap, typing.get_args(annotation)):
        if _is_model(member) and "kind" in member.model_fields:
            variants.update(dict.fromkeys(typing.get_args(member.model_fields["kind"].annotation), member))
    return variants


def _union_tags(annotation: Any) -> list[str]:
    return list(_variants(annotation))


def _union_member(annotation: Any, key: Any) -> Any:
    return _variants(annotation).get(key) if isinstance(key, str) else None


def _child(annotation: Any, key: Any) -> Any:
    if _is_model(annotation):
        field = annotation.model_fields.get(key)
        return field.annotation if field is not None else None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is dict and len(args) == 2:
        return args[1]
    if origin in (tuple, list) and args:
        return args[0]
    if origin in (Union, types.UnionType):  # Optional[X]: step into the non-None member
        options = [a for a in args if a is not type(None)]
        return _child(_unwrap(options[0]), key) if len(options) == 1 else None
    return None


def _choices(names: Any) -> str:
    return "choices: " + ", ".join(repr(name) for name in names)


def _strip_quotes(text: str) -> str:
    return text.strip("'\"")
