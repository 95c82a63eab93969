"""The `itm` console command. `itm search` ranks the indexed split for a text or an image with a trained matcher;
`itm experiments` shows one figure of every model across DVC's experiments (itm/experiments.py); `itm tracking
sync` sends to MLflow what runs kept locally while their tracking store did not answer (itm/tracking/runs.py); `itm
ui` serves MLflow's UI on the pipeline's runs (itm/tracking/ui.py); `itm offline-plots` makes DVC's plots pages draw
without the network (itm/offline_plots.py).

    itm search --model models/scan_t2i_avg --text "a red circle to the left of a blue square" --top 5
    itm search --model models/scan_t2i_avg/seed1 --image data/raw/synthetic/images/<file>.jpg --sheet sheet.png

`--model` is a model folder, `models/<matcher>/seed<seed>` as `train@<matcher>-<seed>` writes it, or a matcher's
folder `models/<matcher>`, which means its model of `--seed` (default: the first of `train.seeds` in params.yaml).
Run it from the repository: the defaults are the pipeline's paths, and the dataset folder is
data/raw/<dataset of params.yaml>. Results go to stdout, logging and progress to stderr; a mistake is one line
`error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from itm import environment
from itm.atomic import check_writable
from itm.config import PARAMS_FILE, load_params
from itm.errors import UserError
from itm.search.options import DEFAULT_SHORTLIST, DEFAULT_SHORTLIST_BY, SHORTLIST_BY, Options
from itm.seeds import seed_path
from itm.stage_runner import run_stage

if TYPE_CHECKING:
    from itm.search.engine import SearchResult


class _Parser(argparse.ArgumentParser):
    """Argument mistakes become a `UserError`: one line, exit status 2, like every other mistake."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="itm", description="Image-text matching: commands on the pipeline's data and models.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    search = commands.add_parser(
        "search",
        help="the best images for a text, or the best captions for an image",
        description="Rank the indexed split's images for --text, or its captions for --image, with a trained "
        "matcher. Cross-attention matchers (SCAN, UARDA) rank the gallery with a cheap score first and re-rank "
        "the best --shortlist items with the full score.",
    )
    search.add_argument(
        "--model", required=True,
        help="a trained matcher: models/<matcher>/seed<seed>, models/<matcher> for its model of --seed, or an MLflow "
        "URI (runs:/<train run id>/model, models:/<model id>, models:/<registered name>/<version>)",
    )  # fmt: skip
    search.add_argument(
        "--seed", type=int,
        help="with --model models/<matcher>: the training seed (default: the first of train.seeds in ./params.yaml)",
    )  # fmt: skip
    search.add_argument("--text", help="a caption to find images for")
    search.add_argument("--image", type=Path, help="an image file to find captions for (indexed or not)")
    search.add_argument("--top", type=int, default=5, help="how many results (default 5)")
    search.add_argument("--split", choices=("train", "val", "test"), default="test", help="default test")
    search.add_argument("--sheet", type=Path, help="also write a contact sheet PNG here")
    search.add_argument(
        "--shortlist", type=int, default=DEFAULT_SHORTLIST,
        help=f"cross-attention matchers: items re-ranked with the full score (default {DEFAULT_SHORTLIST}; "
        "0: score every item with the full score)",
    )  # fmt: skip
    search.add_argument(
        "--shortlist-by", choices=SHORTLIST_BY, default=DEFAULT_SHORTLIST_BY,
        help="the cheap score: hard (SCAN's cross attention as λ1 → ∞: each fragment attends to its best match "
        f"only) or pooled (cosine of the pooled vectors); default {DEFAULT_SHORTLIST_BY}",
    )  # fmt: skip
    search.add_argument("--regions", type=Path, default=Path("data/regions"), help="the region stores (data/regions)")
    search.add_argument("--captions", type=Path, default=Path("data/captions"), help="the tokenized captions")
    search.add_argument("--dataset", type=Path, help="data/raw/<dataset>; default: the dataset of ./params.yaml")
    search.add_argument("--detector", type=Path, default=Path("models/detector"), help="for images outside the index")
    search.add_argument("--batch-size", type=int, default=128, help="images or captions encoded at once")
    experiments = commands.add_parser(
        "experiments",
        help="one figure of every model across DVC's experiments: a row per model, a column per experiment",
        description="The figure of every model in reports/comparison.json for the workspace, HEAD and its DVC "
        "experiments (what `dvc exp show` lists), turned so that models run down and experiments across.",
    )
    experiments.add_argument("--figure", default="rsum", help="a column of the comparison: rsum (default), i2t_r1, ...")
    experiments.add_argument("--protocol", default="test", help="test (default), test_5fold1k or test_5k on COCO")
    experiments.add_argument(
        "-n", "--num", type=int, default=1, help="commits back from HEAD, with their experiments (default 1; -1: all)"
    )
    tracking = commands.add_parser(
        "tracking", help="the MLflow tracking store", description="What stages could not send to MLflow."
    )
    actions = tracking.add_subparsers(dest="action", required=True, parser_class=_Parser)
    actions.add_parser(
        "sync",
        help="send what runs kept locally while their tracking store was away; end runs of killed processes",
        description="Send to its tracking store what every run kept in data/work/tracking/ while the store did not "
        "answer (the next stage to start sends it too), and end as KILLED the runs whose process died with the run "
        "open. Runs still open in a live process are left alone.",
    )
    ui = commands.add_parser(
        "ui",
        help="MLflow's UI on the pipeline's runs",
        description="Start `mlflow ui` on the repository's tracking store (mlflow.db, or MLFLOW_TRACKING_URI) and "
        "print the address of the itm experiment's runs, which opens on the runs rather than on MLflow's GenAI "
        "view. For a tracking server (an http address), print its address only.",
    )
    ui.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    ui.add_argument("--port", type=int, default=5000, help="default 5000")
    offline = commands.add_parser(
        "offline-plots",
        help="make `dvc plots show` pages draw without the network",
        description="Fetch Vega, Vega-Lite and Vega-Embed once from the npm registry (the releases DVC's page loads "
        "from a CDN; sha256-checked, kept in data/downloads), write .dvc/plots/offline.html with them inlined, and "
        "set plots.html_template in .dvc/config.local, so `dvc plots show` and `dvc plots diff` pages draw offline.",
    )
    offline.add_argument("--registry", default="https://registry.npmjs.org", help="an npm registry or its mirror")
    offline.add_argument("--cache", type=Path, default=Path("data/downloads"), help="where downloads are kept")
    return parser


def _main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "search":
        search(args)
    elif args.command == "experiments":
        show_experiments(args)
    elif args.command == "tracking":
        sync_tracking()
    elif args.command == "offline-plots":
        make_plots_offline(args)
    elif args.command == "ui":
        from itm.tracking.ui import serve

        serve(args.host, args.port)


def make_plots_offline(args: argparse.Namespace) -> None:
    """`itm offline-plots`: the template written, and DVC's local config pointing at it."""
    from itm.offline_plots import write_offline_template
    from itm.tracking import repository_root

    dvc_dir = repository_root() / ".dvc"
    if not dvc_dir.is_dir():
        raise UserError(f"{Path.cwd()}: not inside a DVC repository (no .dvc folder above it)")
    path = write_offline_template(dvc_dir, args.cache, registry=args.registry)
    print(f"wrote {path}; `dvc plots show` and `dvc plots diff` pages now draw offline (plots.html_template)")


def sync_tracking() -> None:
    """`itm tracking sync`: a line per run sent or ended; a store that still does not answer is an error line."""
    from itm.tracking import send_kept

    settled = send_kept()
    for line in settled.done:
        print(line)
    if settled.still_open:
        print(f"{settled.still_open} runs are open in live processes: left to them")
    if settled.failed:
        raise UserError("\n".join(settled.failed))
    if not settled.done:
        print("nothing to send: every run reached its tracking store")


def show_experiments(args: argparse.Namespace) -> None:
    """`itm experiments`: the turned table of one figure, or one line saying that no row has it."""
    from itm.experiments import experiment_rows, transposed_table

    table = transposed_table(experiment_rows(args.num), args.protocol, args.figure)
    if not table:
        raise UserError(f"itm experiments: no experiment has {args.protocol}.<model>.{args.figure} in its metrics")
    print(table)


def search(args: argparse.Namespace) -> None:
    """`itm search`: check the arguments, open the index, run the query, print the table (and write the sheet)."""
    if (args.text is None) == (args.image is None):
        raise UserError("itm search: give either --text or --image (exactly one)")
    if args.text is not None and not args.text.strip():
        raise UserError("itm search: --text is empty")
    if args.batch_size < 1:
        raise UserError(f"itm search: --batch-size must be at least 1, got {args.batch_size}")
    options = Options(top=args.top, shortlist=args.shortlist, shortlist_by=args.shortlist_by)
    if args.image is not None and not args.image.is_file():
        raise UserError(f"{args.image}: image not found")
    if args.sheet is not None:  # before the search, whose results would be printed before the sheet failed
        check_writable(files=[args.sheet])
    # The search's modules (torch among them) are imported once the arguments are known to be good.
    from itm.data.splits import DataFolders
    from itm.device import default_device
    from itm.search.engine import search_image, search_text
    from itm.search.index import open_index
    from itm.search.presentation import format_table, write_sheet

    data = DataFolders(args.regions, args.captions, args.dataset or _dataset_dir())
    with tempfile.TemporaryDirectory(prefix="itm-model-") as scratch:  # an MLflow model's download, for the search
        model_dir = _model_dir(args.model, args.seed, Path(scratch))
        index = open_index(model_dir, data, args.split, device=default_device(), batch_size=args.batch_size)
        if args.text is not None:
            result = search_text(index, args.text, options)
        else:
            result = search_image(index, args.image, options, args.detector)
    print(_header(index.name, args.split, result))
    print(format_table(result))
    sys.stdout.flush()
    if args.sheet is not None:
        write_sheet(result, args.sheet)
        print(f"contact sheet: {args.sheet}", file=sys.stderr)


def _header(name: str, split: str, result: SearchResult) -> str:
    """One comment line above the table: the model, the gallery and what the query cost."""
    what = "images" if result.kind == "text" else "captions"
    if result.kind == "image":
        known = result.query_image_id is not None
        what += f" for image {result.query_image_id}" if known else " for an image outside the index"
    scored = "all" if result.scored == result.gallery else f"{result.scored} shortlisted"
    return (
        f"# {name}: top {len(result.hits)} of {result.gallery} {split} {what} ({scored} scored in full, "
        f"{result.seconds * 1000:.1f} ms)"
    )


def _model_dir(argument: str, seed: int | None, scratch: Path) -> Path:
    """The model folder `--model` names: an MLflow URI's files downloaded into `scratch`; a model folder itself
    (models/<matcher>/seed<seed>); for a matcher's folder (models/<matcher>), its `seed<seed>` folder; a folder that
    does not exist is left for `open_index` to name, and another model's folder (the detector's) is refused."""
    from itm.search.index import is_matcher_folder, refuse_other_model
    from itm.tracking import download_model, is_model_uri

    if is_model_uri(argument):
        if seed is not None:
            raise UserError(f"itm search: --seed picks a model of a matcher's folder, but {argument} is one model")
        return download_model(argument, scratch)
    model = Path(argument)
    if is_matcher_folder(model):
        if seed is not None:
            raise UserError(f"itm search: --seed picks a model of a matcher's folder, but {model} is a model folder")
        return model
    if not model.is_dir():
        return model
    refuse_other_model(model)
    return seed_path(model.parent, model.name, _first_seed() if seed is None else seed)


def _first_seed() -> int:
    """The first of `train.seeds` in ./params.yaml: the seed whose model the pipeline's comparison shows."""
    if not PARAMS_FILE.is_file():
        raise UserError(f"{PARAMS_FILE} not found in {Path.cwd()}: run from the repository or pass --seed")
    return load_params(PARAMS_FILE).train.seeds[0]


def _dataset_dir() -> Path:
    """data/raw/<dataset> for the `dataset` of ./params.yaml (the pipeline's layout)."""
    if not PARAMS_FILE.is_file():
        raise UserError(f"{PARAMS_FILE} not found in {Path.cwd()}: run from the repository or pass --dataset")
    return Path("data/raw") / load_params(PARAMS_FILE).dataset


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `itm` console script (and of tests, with `argv`)."""
    environment.pin()  # before the search imports torch
    run_stage(_main, argv)


if __name__ == "__main__":
    main()
