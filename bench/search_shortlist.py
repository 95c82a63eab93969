"""Benchmark the shortlist of `itm search`: full cross-attention scoring against a cheap score's shortlist re-ranked
with the full score, on the pipeline's trained models and test split, for text queries and for image queries.

    python -m bench.search_shortlist                                   # scan_t2i_avg, scan_i2t_lse, uarda
    python -m bench.search_shortlist --models uarda --timed-texts 100 --timed-images 50 --repeats 5

For each model (models/<name>/seed<seed>, or under `--models-dir`; `--seed`, default the first of train.seeds) the
test split is opened as `itm search` opens it
(`itm.search.open_index` on the pipeline's folders, `itm.data.splits.DataFolders`) and its galleries are encoded
once (synthetic default: 1,000 images × 5,000 captions).

Quality, with every caption as a text query (text→image) and every image as an image query (image→text): R@1/5/10
(ties count against the ground truth, as `itm.evaluate.metrics`) of
- the full ranking: the matrix `evaluate` computes (`score_matrix`);
- a shortlist of N by a cheap score, re-ranked with the full score: `hard t2i` / `hard i2t` (SCAN's attention with
  λ1 → ∞, the words or the regions attending), `pooled` (cosine of the pooled vectors). Every pair's full score
  depends on that pair only, so re-scoring a shortlist gives the full matrix's values for it: the re-ranking is
  taken from the matrix, and checked against the real search path on the timed queries ("agree": same top 10);
- the cheap score alone (shortlist "none": no re-ranking).
"in list" is the share of queries with a ground-truth item in the shortlist: the ceiling of any R@K after
re-ranking. `--shortlist-by hard` uses one of the two hard directions per query side (`itm.search.hard_direction`,
marked *); the other is shown for quality only.

Speed: milliseconds per query of the search path as `itm search` runs it (one query against the encoded gallery:
cheap score, shortlist, full score of the shortlist, sort; encoding excluded), on the first `--timed-texts` captions
and `--timed-images` images, median of `--repeats` runs after a warm-up. The reference is the full score of one
query against the whole gallery; the speed-up is relative to it. The evaluation's batched throughput (the whole
matrix at once, per caption) is printed for context: a search answers one query at a time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from bench.common import REPO
from itm.config import load_params
from itm.data.splits import DataFolders
from itm.evaluate.scoring import score_matrix
from itm.models.base import Encoded
from itm.pair_attention import is_cross_attention
from itm.search.index import SearchIndex, open_index
from itm.search.shortlist import cheap_scores, hard_attention_scores, hard_direction, shortlist_rank
from itm.seeds import seed_path

MODELS = ("scan_t2i_avg", "scan_i2t_lse", "uarda")
SHORTLISTS = (10, 20, 50, 100, 200)
KS = (1, 5, 10)
TOP = 10  # results per query in the timed search path (and in the agreement check)
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Row:
    method: str
    shortlist: int | None  # None: the full ranking; 0: the cheap score alone
    recall: dict[int, float]
    in_list: float | None = None
    ms: float | None = None
    agree: tuple[int, int] | None = None


@dataclass(frozen=True)
class Side:
    """One query side: matrices laid out [gallery, queries] and how the search path scores one query."""

    name: str  # "text" or "image"
    full: Tensor  # [G, Q] full scores
    relevant: Tensor  # [G, Q] bool, the ground truth of each query
    queries: list[Encoded]  # the timed queries, as `itm search` encodes one
    cheap: Callable[[Encoded, str], Tensor]  # (query, by) -> [G]
    score_rows: Callable[[Encoded, Tensor], Tensor]  # (query, gallery rows [m]) -> [m]


# --- quality from matrices -----------------------------------------------------------------------------------------


def ranks(full: Tensor, cheap: Tensor | None, relevant: Tensor, n: int | None) -> tuple[Tensor, Tensor]:
    """[Q] 0-based rank of each query's best ground-truth item after re-ranking the `n` best items by `cheap` with
    `full` (every item when `n` is None; G when no ground truth is listed), and [Q] whether one was listed.

    The rank counts the listed non-ground-truth items scoring >= the best listed ground truth (ties against it):
    for all items this is `itm.evaluate.metrics`' t2i rank (text queries) and i2t rank (image queries)."""
    n_gallery, n_queries = full.shape
    if n is None:
        listed = torch.arange(n_gallery)[:, None].expand(n_gallery, n_queries)
    else:
        listed = torch.topk(cheap, n, dim=0).indices  # [n, Q]
    values, truth = full.gather(0, listed), relevant.gather(0, listed)  # [n, Q]
    best = values.masked_fill(~truth, -torch.inf).amax(dim=0)  # [Q]
    inside = truth.any(dim=0)
    rank = ((values >= best[None]) & ~truth).sum(dim=0)
    return torch.where(inside, rank, torch.full_like(rank, n_gallery)), inside


def recalls(rank: Tensor) -> dict[int, float]:
    return {k: 100.0 * float((rank < k).float().mean()) for k in KS}


# --- timing of the search path --------------------------------------------------------------------------------------


def trimmed(encoded: Encoded, row: int) -> Encoded:
    """Item `row` of an encoded gallery as a batch of one, trimmed to its own fragments (as a single query is)."""
    item = encoded.take(torch.tensor([row]))
    return item.trimmed(int(item.mask[0].sum()))


def search_path(side: Side, by: str | None, n: int) -> Callable[[Encoded], Tensor]:
    """One query -> its top rows, as `itm.search` ranks: cheap `by` and shortlist `n`, or (`by` None) the full score
    of every item."""
    gallery_size = side.full.shape[0]

    def run(query: Encoded) -> Tensor:
        cheap = None if by is None else side.cheap(query, by)
        rows, _ = shortlist_rank(cheap, lambda rows: side.score_rows(query, rows), gallery_size, shortlist=n, top=TOP)
        return rows

    return run


def time_per_query(run: Callable[[Encoded], Tensor], queries: list[Encoded], repeats: int) -> tuple[float, list]:
    """Median over `repeats` runs of the mean milliseconds per query, and the last run's results."""
    with torch.no_grad():
        for query in queries[:5]:
            run(query)  # warm-up
        times, results = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            results = [run(query) for query in queries]
            times.append((time.perf_counter() - started) * 1000 / len(queries))
    return statistics.median(times), results


def predicted(side: Side, cheap: Tensor | None, n: int) -> list[Tensor]:
    """The top rows the matrices give the timed queries (queries are the first columns)."""
    out = []
    for q in range(len(side.queries)):
        column = None if cheap is None else cheap[:, q]
        rows, _ = shortlist_rank(column, lambda rows, q=q: side.full[rows, q], side.full.shape[0], shortlist=n, top=TOP)
        out.append(rows)
    return out


def agreement(results: list[Tensor], expected: list[Tensor]) -> tuple[int, int]:
    return sum(torch.equal(got, want) for got, want in zip(results, expected, strict=True)), len(results)


# --- one model ------------------------------------------------------------------------------------------------------


def sides(index: SearchIndex, images: Encoded, captions: Encoded, full: Tensor, args: argparse.Namespace) -> list:
    matcher = index.matcher
    row_of = {image_id: row for row, image_id in enumerate(index.image_ids)}
    truth = torch.tensor([row_of[int(i)] for i in index.captions.image_ids])  # [n_cap] row of each caption's image
    relevant = truth[None, :] == torch.arange(len(images))[:, None]  # [n_img, n_cap]
    text = Side(
        "text", full, relevant,
        [trimmed(captions, c) for c in range(min(args.timed_texts, len(captions)))],
        lambda query, by: cheap_scores(matcher, images, query, by, "text")[:, 0],
        lambda query, rows: matcher.score(images.take(rows), query)[:, 0],
    )  # fmt: skip
    image = Side(
        "image", full.T, relevant.T,
        [trimmed(images, i) for i in range(min(args.timed_images, len(images)))],
        lambda query, by: cheap_scores(matcher, query, captions, by, "image")[0],
        lambda query, rows: matcher.score(query, captions.take(rows))[0],
    )  # fmt: skip
    return [text, image]


def measure_side(index: SearchIndex, side: Side, images: Encoded, captions: Encoded, args: argparse.Namespace) -> list:
    """The table rows of one query side."""
    chosen = hard_direction(index.matcher, side.name)
    with torch.no_grad():
        cheap = {f"hard {d}": hard_attention_scores(images, captions, d) for d in ("t2i", "i2t")}
        cheap["pooled"] = images.pooled @ captions.pooled.T
    if side.name == "image":
        cheap = {method: matrix.T for method, matrix in cheap.items()}  # [G, Q]
    ms, results = time_per_query(search_path(side, None, 0), side.queries, args.repeats)
    full_rank, _ = ranks(side.full, None, side.relevant, None)
    out = [Row("- (full)", None, recalls(full_rank), None, ms, agreement(results, predicted(side, None, 0)))]
    for method, matrix in cheap.items():
        by = "pooled" if method == "pooled" else "hard"
        timed = method == "pooled" or method == f"hard {chosen}"
        label = f"{method}{' *' if method == f'hard {chosen}' else ''}"
        alone, _ = ranks(matrix, None, side.relevant, None)
        row = Row(label, 0, recalls(alone))
        if timed:
            ms, results = time_per_query(lambda query, by=by: torch.topk(side.cheap(query, by), TOP).indices,
                                         side.queries, args.repeats)  # fmt: skip
            expected = [torch.topk(matrix[:, q], TOP).indices for q in range(len(side.queries))]
            row = Row(label, 0, row.recall, None, ms, agreement(results, expected))
        out.append(row)
        for n in args.shortlists:
            rank, inside = ranks(side.full, matrix, side.relevant, n)
            row = Row(label, n, recalls(rank), 100.0 * float(inside.float().mean()))
            if timed:
                ms, results = time_per_query(search_path(side, by, n), side.queries, args.repeats)
                row = Row(label, n, row.recall, row.in_list, ms, agreement(results, predicted(side, matrix, n)))
            out.append(row)
    return out


def measure(name: str, args: argparse.Namespace, data: DataFolders) -> None:
    index = open_index(seed_path(args.models_dir, name, args.seed), data, "test", device=CPU)
    if not is_cross_attention(index.matcher):
        raise SystemExit(f"{name}: not a cross-attention matcher; its search scores every item in full")
    images, captions = index.gallery_images(), index.gallery_captions()
    batched = []
    for _ in range(args.repeats):
        scored = score_matrix(index.matcher, images, captions, image_chunk=256, caption_chunk=1024, device=CPU,
                              precision="fp32")  # fmt: skip
        batched.append(scored.score_seconds * 1000 / len(captions))
    print(f"\n{name} ({len(images)} images x {len(captions)} captions): evaluate's batched full matrix "
          f"{statistics.median(batched):.2f} ms per caption")  # fmt: skip
    for side in sides(index, images, captions, scored.matrix, args):
        print_table(side, measure_side(index, side, images, captions, args))


# --- output ---------------------------------------------------------------------------------------------------------


def print_table(side: Side, rows: list[Row]) -> None:
    gallery = "images" if side.name == "text" else "captions"
    print(f"  {side.name} queries ({side.full.shape[1]}) -> {gallery}; timed on {len(side.queries)} queries")
    print(f"  {'cheap score':12} {'shortlist':>9} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'in list':>8} {'ms/query':>9} "
          f"{'speed-up':>9} {'agree':>8}")  # fmt: skip
    reference = rows[0].ms
    for row in rows:
        shortlist = "all" if row.shortlist is None else ("none" if row.shortlist == 0 else str(row.shortlist))
        in_list = "-" if row.in_list is None else f"{row.in_list:.1f}"
        ms = "-" if row.ms is None else f"{row.ms:.2f}"
        speedup = "-" if row.ms is None else f"{reference / row.ms:.1f}x"
        agree = "-" if row.agree is None else f"{row.agree[0]}/{row.agree[1]}"
        print(f"  {row.method:12} {shortlist:>9} {row.recall[1]:>6.1f} {row.recall[5]:>6.1f} {row.recall[10]:>6.1f} "
              f"{in_list:>8} {ms:>9} {speedup:>9} {agree:>8}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.search_shortlist",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="names under --models-dir")
    parser.add_argument("--shortlists", nargs="+", type=int, default=list(SHORTLISTS))
    parser.add_argument("--timed-texts", type=int, default=200, help="captions the text search path is timed on")
    parser.add_argument("--timed-images", type=int, default=50, help="images the image search path is timed on")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--seed", type=int, help="the models' training seed (default: the first of train.seeds)")
    parser.add_argument("--regions", type=Path, default=REPO / "data/regions")
    parser.add_argument("--captions", type=Path, default=REPO / "data/captions")
    parser.add_argument("--dataset", type=Path, help="data/raw/<dataset>; default: the dataset of params.yaml")
    args = parser.parse_args()
    if args.dataset is None or args.seed is None:  # params.yaml says what the options do not
        params = load_params(REPO / "params.yaml")
        args.dataset = args.dataset or REPO / "data/raw" / params.dataset
        args.seed = params.train.seeds[0] if args.seed is None else args.seed
    data = DataFolders(args.regions, args.captions, args.dataset)
    print(f"cpu, torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} runs, "
          f"top {TOP} per query; speed-up against the full score of one query; * = the direction `--shortlist-by "
          "hard` uses")  # fmt: skip
    for name in args.models:
        measure(name, args, data)


if __name__ == "__main__":
    main()
