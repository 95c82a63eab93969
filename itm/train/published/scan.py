"""kuanghuei/SCAN checkpoints (`model_best.pth.tar`) as our `scan` matcher.

The file is `torch.save({'epoch', 'model': [img_enc.state_dict(), txt_enc.state_dict()], 'best_rsum', 'opt',
'Eiters'})` (SCAN `train.py` `save_checkpoint`, `model.py` `SCAN.state_dict`), `opt` the `argparse.Namespace` of
its training options. Its modules map onto ours one to one (SCAN `model.py`):

    EncoderImagePrecomp  fc.{weight,bias}                  -> image_encoder.fc.*   (RegionEncoder, pool_first=False)
    EncoderText          embed.weight                      -> text_encoder.embed.weight
                         rnn.{weight,bias}_{ih,hh}_l0[_reverse] -> text_encoder.gru.*

and the options pick the scorer: `cross_attn` t2i|i2t, `agg_func` Mean (AVG) | LogSumExp (LSE), `lambda_softmax`,
`lambda_lse`; `bi_gru`, `embed_size`, `word_dim`, `img_dim`. SCAN's other choices that our `scan` matcher does not
build (`raw_feature_norm` other than clipped_l2norm, `precomp_enc_type` weight_norm, `no_imgnorm`, `no_txtnorm`,
`agg_func` Max or Sum, more than one GRU layer) are refused by name rather than approximated.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from itm.config import ScanParams
from itm.errors import UserError

POOLING = {"Mean": "avg", "LogSumExp": "lse"}  # SCAN `agg_func` -> our pooling
IMAGE_KEYS = {"fc.weight", "fc.bias"}
GRU_TENSORS = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
# option -> the only value our scan matcher builds
REQUIRED_OPTIONS = {
    "raw_feature_norm": "clipped_l2norm",
    "precomp_enc_type": "basic",
    "no_imgnorm": False,
    "no_txtnorm": False,
    "num_layers": 1,
}
# our ScanParams key -> how to read it from the options
OPTION_KEYS = {
    "direction": "cross_attn",
    "pooling": "agg_func",
    "lambda_softmax": "lambda_softmax",
    "lambda_lse": "lambda_lse",
    "bidirectional": "bi_gru",
    "embed_dim": "embed_size",
    "word_dim": "word_dim",
    "margin": "margin",
    "max_violation": "max_violation",
}


def is_scan_checkpoint(content: Any) -> bool:
    """Whether `content` has SCAN's outer format: `model` = [image encoder state, text encoder state] and `opt`."""
    if not isinstance(content, Mapping) or "opt" not in content:
        return False
    model = content.get("model")
    return isinstance(model, list | tuple) and len(model) == 2 and set(model[0]) == IMAGE_KEYS


def scan_params(path: Path, options: Mapping[str, Any], block: ScanParams) -> ScanParams:
    """Our `scan` params for a checkpoint trained with `options`: the block's, with every key SCAN's options fix
    taken from them. A key the block sets itself must agree; an option our matcher does not build is refused."""
    missing = [option for option in (*OPTION_KEYS.values(), *REQUIRED_OPTIONS) if option not in options]
    if missing:
        raise UserError(f"{path}: not a SCAN checkpoint: its options have no {', '.join(missing)}")
    for option, supported in REQUIRED_OPTIONS.items():
        if options[option] != supported:
            raise UserError(f"{path}: trained with {option}={options[option]!r}; the scan matcher builds {supported!r}")
    if options["agg_func"] not in POOLING:
        raise UserError(f"{path}: trained with agg_func={options['agg_func']!r}; the scan matcher pools by "
                        f"{' or '.join(POOLING)}")  # fmt: skip
    values: dict[str, Any] = {key: options[option] for key, option in OPTION_KEYS.items()}
    values["pooling"] = POOLING[options["agg_func"]]
    for key in block.model_fields_set & set(values):
        if getattr(block, key) != values[key]:
            raise UserError(
                f"matchers: {key} is {getattr(block, key)!r}, but the checkpoint {path.name} was trained with "
                f"{OPTION_KEYS[key]}={options[OPTION_KEYS[key]]!r}; remove the key or fix it"
            )
    return block.model_copy(update=values)


def scan_state_dict(path: Path, model: list[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """SCAN's [image encoder, text encoder] states in our `Matcher`'s names."""
    image, text = model
    state = {f"image_encoder.{key}": value for key, value in image.items()}
    unexpected = sorted(set(text) - {"embed.weight", *_gru_keys(bidirectional=True)})
    if unexpected:
        raise UserError(f"{path}: the text encoder has tensors SCAN's EncoderText does not: {', '.join(unexpected)}")
    for key, value in text.items():
        ours = key if key == "embed.weight" else f"gru.{key.removeprefix('rnn.')}"
        state[f"text_encoder.{ours}"] = value
    return state


def _gru_keys(*, bidirectional: bool) -> list[str]:
    suffixes = ("", "_reverse") if bidirectional else ("",)
    return [f"rnn.{tensor}{suffix}" for tensor in GRU_TENSORS for suffix in suffixes]
