"""woodfrog/vse_infty checkpoints (`model_best.pth`) of BUTD-region + bi-GRU models as our `vse_infty` matcher.

The file is `torch.save({'epoch', 'model': [img_enc.state_dict(), txt_enc.state_dict()], 'best_rsum', 'opt',
'Eiters'})` (VSE∞ `train.py` `save_checkpoint`, `lib/vse.py` `VSEModel.state_dict`), `opt` the `argparse.Namespace`
of its training options. Branch bigru builds the region models (`precomp_enc_type` basic, `lib/encoders.py`), whose
modules map onto ours one to one:

    EncoderImageAggr  fc.{weight,bias}                       -> image_encoder.fc.*
                      mlp.layers.{0,1}.{weight,bias}         -> image_encoder.mlp.layers.*
                      mlp.bns.0.*                            -> image_encoder.mlp.norm.*
                      mlp.bns.1.*                            (built by VSE∞'s MLP, never applied: left out)
                      gpool.gru.*, gpool.linear.weight       -> image_encoder.gpool.*
    EncoderText       embed.weight                           -> text_encoder.embed.weight
                      rnn.{weight,bias}_{ih,hh}_l0[_reverse] -> text_encoder.gru.*
                      gpool.gru.*, gpool.linear.weight       -> text_encoder.gpool.*

(a `module.` prefix, which `nn.DataParallel` adds, is removed first). The embedding has one row more than the
vocabulary file has words: VSE∞ appends <mask> (`train.py`: `vocab.add_word('<mask>')`), as our text encoder does.
The options fix `embed_size`, `word_dim`, `margin` and `max_violation`; the GPO's sizes (hard-coded `GPO(32, 32)`)
are read from its tensors. What our matcher does not build is refused by name: `precomp_enc_type` backbone (grid
features from a CNN), a BERT text encoder (the master branch's), `no_imgnorm`, `no_txtnorm`, several GRU layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from itm.config import VseInftyParams
from itm.data.vocab import Vocab
from itm.errors import UserError

MASK_WORD = "<mask>"  # appended to the vocabulary by VSE∞ train.py and by our text encoder's embedding
APPENDED_ROWS = 1  # the embedding's rows beyond the vocabulary file's words
IMAGE_MARKERS = {"fc.weight", "gpool.linear.weight"}  # EncoderImageAggr's tensors that tell the layout apart
UNUSED_BATCH_NORM = "mlp.bns.1."  # VSE∞ MLP's BatchNorm after its last layer: built, never applied
GRU_TENSORS = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
# option -> the only value our vse_infty matcher builds
REQUIRED_OPTIONS: dict[str, Any] = {"precomp_enc_type": "basic", "no_imgnorm": False, "no_txtnorm": False}
# our VseInftyParams key -> the option it is read from
OPTION_KEYS = {"embed_dim": "embed_size", "word_dim": "word_dim", "margin": "margin", "max_violation": "max_violation"}


def is_vse_infty_checkpoint(content: Any) -> bool:
    """Whether `content` has VSE∞'s outer format: `model` = [image encoder state, text encoder state], the first
    an `EncoderImageAggr`'s (fc and GPO) or an `EncoderImageFull`'s (a CNN and one under `image_encoder.`), and
    `opt`."""
    if not isinstance(content, Mapping) or "opt" not in content:
        return False
    model = content.get("model")
    if not (isinstance(model, list | tuple) and len(model) == 2 and isinstance(model[0], Mapping)):
        return False
    keys = set(_unwrapped(model[0]))
    return keys >= IMAGE_MARKERS or keys >= {f"image_encoder.{key}" for key in IMAGE_MARKERS}


def vse_infty_params(
    path: Path, options: Mapping[str, Any], model: list[Mapping[str, Tensor]], block: VseInftyParams
) -> VseInftyParams:
    """Our `vse_infty` params for a checkpoint trained with `options` whose states are `model`: the block's, with
    every key the checkpoint fixes taken from it. A key the block sets itself must agree; what our matcher does
    not build is refused."""
    text = _unwrapped(model[1])
    if any(key.startswith("bert.") for key in text):
        raise UserError(f"{path}: its text encoder is BERT (VSE∞'s master branch); the vse_infty matcher builds the "
                        "bi-GRU of its bigru branch")  # fmt: skip
    missing = [option for option in (*OPTION_KEYS.values(), *REQUIRED_OPTIONS) if option not in options]
    if missing:
        raise UserError(f"{path}: not a VSE∞ checkpoint: its options have no {', '.join(missing)}")
    for option, supported in REQUIRED_OPTIONS.items():
        if options[option] != supported:
            raise UserError(
                f"{path}: trained with {option}={options[option]!r}; the vse_infty matcher builds {supported!r}"
            )
    if options.get("num_layers", 1) != 1:
        raise UserError(f"{path}: trained with num_layers={options['num_layers']!r}; the vse_infty matcher builds 1")
    values: dict[str, Any] = {key: options[option] for key, option in OPTION_KEYS.items()}
    values["bidirectional"] = "rnn.weight_ih_l0_reverse" in text
    image = _unwrapped(model[0])
    values["gpo_pe_dim"], values["gpo_hidden_dim"] = _gpo_sizes(path, image, "image")
    if _gpo_sizes(path, text, "text") != (values["gpo_pe_dim"], values["gpo_hidden_dim"]):
        raise UserError(f"{path}: the image and text encoders' GPOs are of different sizes")
    for key in block.model_fields_set & set(values):
        if getattr(block, key) != values[key]:
            source = OPTION_KEYS.get(key, "its tensors")
            raise UserError(f"matchers: {key} is {getattr(block, key)!r}, but the checkpoint {path.name} was trained "
                            f"with {key}={values[key]!r} ({source}); remove the key or fix it")  # fmt: skip
    return block.model_copy(update=values)


def _gpo_sizes(path: Path, state: Mapping[str, Tensor], side: str) -> tuple[int, int]:
    """(position encoding size, GRU state size) of the GPO in `state`, from its GRU's input weights [3h, d_pe]."""
    weight = state.get("gpool.gru.weight_ih_l0")
    if weight is None or weight.dim() != 2 or weight.shape[0] % 3:
        raise UserError(f"{path}: the {side} encoder has no GPO (gpool.gru.weight_ih_l0 of shape [3 h, d_pe])")
    return int(weight.shape[1]), int(weight.shape[0]) // 3


def check_vocabulary(vocab: Vocab, source: str) -> None:
    """A vocabulary file that already holds <mask> would make VSE∞'s `add_word` a no-op and its embedding one row
    shorter than ours; SCAN's vocabularies, which VSE∞ uses, do not hold it."""
    if MASK_WORD in vocab.words:
        raise UserError(f"{source}: holds {MASK_WORD} at id {vocab.words.index(MASK_WORD)}; VSE∞ appends it itself, "
                        "so its checkpoints' vocabularies do not")  # fmt: skip


def vse_infty_state_dict(path: Path, model: list[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """VSE∞'s [image encoder, text encoder] states in our `Matcher`'s names (what is not VSE∞'s is named)."""
    image, text = _unwrapped(model[0]), _unwrapped(model[1])
    state: dict[str, Tensor] = {}
    for key, value in image.items():
        if key.startswith(UNUSED_BATCH_NORM):
            continue
        ours = f"mlp.norm.{key.removeprefix('mlp.bns.0.')}" if key.startswith("mlp.bns.0.") else key
        state[f"image_encoder.{ours}"] = value
    unknown = sorted(set(text) - {"embed.weight", *_text_gru_keys(), *_gpo_keys()})
    if unknown:
        raise UserError(f"{path}: the text encoder has tensors VSE∞'s EncoderText does not: {', '.join(unknown)}")
    for key, value in text.items():
        ours = f"gru.{key.removeprefix('rnn.')}" if key.startswith("rnn.") else key
        state[f"text_encoder.{ours}"] = value
    return state


def _unwrapped(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`state` without the `module.` prefix `nn.DataParallel` gives every key."""
    return {key.removeprefix("module."): value for key, value in state.items()}


def _text_gru_keys() -> list[str]:
    return [f"rnn.{tensor}{suffix}" for tensor in GRU_TENSORS for suffix in ("", "_reverse")]


def _gpo_keys() -> list[str]:
    return ["gpool.linear.weight", *(f"gpool.gru.{tensor}{suffix}" for tensor in GRU_TENSORS
                                     for suffix in ("", "_reverse"))]  # fmt: skip
