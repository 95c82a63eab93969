"""Smoke tests of the benchmarks in bench/: each runs as `python -m bench.<name>` from the repository root on a tiny
case, exits 0 and prints its table, and the benchmarks that check their results against a reference say they did.

The precision and search-shortlist benchmarks read trained matchers and the pipeline's folders: they get
`tests.test_search`'s tiny matchers trained by the real train stage on the tiny synthetic data, never the
repository's own models/ or data/.
"""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import module_name
from bench.run_all import BENCHMARKS
from tests.conftest import REPO, TINY_SYNTHETIC
from tests.test_matcher_stages import prepared  # noqa: F401  (the module fixture `repo` builds on)
from tests.test_search import repo  # noqa: F401  (the module fixture: tiny trained matchers and their data)

TIMEOUT = 600  # seconds: a benchmark that hangs fails its test instead of stalling the suite
N_TEST_IMAGES = TINY_SYNTHETIC["splits"]["test"]


def bench(name: str, *options: str) -> str:
    """Run `python -m bench.<name> *options` from the repository root; its standard output, once it exited 0."""
    command = [sys.executable, "-m", f"bench.{name}", *options]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"{' '.join(command[1:])} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def table_rows(output: str, *header: str) -> list[list[str]]:
    """The rows (cells split on runs of 2+ spaces) of the first table whose header line starts with the cells
    `header`, up to the next blank line (or run_all's line after a benchmark, "=== <name>: <seconds> s")."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if re.split(r"\s{2,}", line.strip())[: len(header)] == list(header))
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip() or line.startswith("=== "):
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


SCIENTIFIC = re.compile(r"^\d\.\de[+-]\d\d$")  # a difference as the tables print it, e.g. 2.2e-08


def test_every_benchmark_is_a_module_of_the_package_that_run_all_runs() -> None:
    """bench/ imports as a package (no sys.path edits), each benchmark starts its cases as `python -m bench.<name>`,
    and run_all runs every one of them."""
    names = sorted(path.stem for path in (REPO / "bench").glob("*.py") if path.stem not in ("__init__", "common"))
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        assert module_name(module.__file__) == f"bench.{name}"
        assert callable(module.main)
    assert sorted(benchmark.name for benchmark in BENCHMARKS) == [name for name in names if name != "run_all"]


@pytest.mark.slow
def test_similarity_checks_the_fast_path_against_the_reference() -> None:
    output = bench("similarity", "--device", "cpu", "--scale", "0.01", "--reference-captions", "2", "--repeats", "1",
                   "--methods", "uarda t2i avg", "--precisions", "fp32")  # fmt: skip
    assert output.startswith("device: cpu, torch ")
    assert "gallery" in output and "implementation" in output and "max |diff|" in output
    rows = {row[2]: row for row in table_rows(output, "gallery", "method", "implementation")}
    assert rows.keys() == {"fast", "reference"}
    assert rows["fast"][:2] == ["f30k 10x50", "uarda t2i avg"]
    assert SCIENTIFIC.match(rows["fast"][8]), rows["fast"]  # the fast scores were compared with the reference's
    assert float(rows["fast"][8]) <= 1e-4
    assert rows["reference"][8] == "-" and rows["reference"][9] == "extrapolated"
    assert "target: each method over COCO 5K" in output


@pytest.mark.slow
def test_extraction_small_model_and_the_selection_check() -> None:
    output = bench("extraction", "--device", "cpu", "--models", "small", "--batches", "1", "--classes", "21",
                   "--repeats", "1")  # fmt: skip
    rows = table_rows(output, "model", "input", "batch")
    assert [row[:4] for row in rows] == [["small", "256x256", "1", "fp32"]]
    assert float(rows[0][4]) > 0  # images/s
    # printed only after the vectorised selection agreed with the reference loop
    assert re.search(r"selection, 300 proposals x 21 classes: reference per-class NMS loop [\d.]+ s, vectorised",
                     output)  # fmt: skip
    assert "not measured: no butd 600x1000 case was run" in output


@pytest.mark.slow
def test_training_times_the_training_step_and_checks_precision() -> None:
    output = bench("training", "--device", "cpu", "--kinds", "scan_t2i_avg", "--steps", "1", "--warmup",
                   "0", "--embed-dim", "16", "--word-dim", "8", "--batch-size", "4", "--feature-dim", "32",
                   "--regions", "4", "--vocab-size", "50", "--concepts", "10")  # fmt: skip
    assert '"embed_dim": 16' in output and '"batch_size": 4' in output
    timed = table_rows(output, "matcher", "precision", "ms/step")
    assert [row[:2] for row in timed] == [["scan_t2i_avg", "fp32"]]
    assert all(float(row[2]) > 0 for row in timed)  # ms/step
    assert "scan_t2i_avg:" in output.split("target: a SCAN epoch", 1)[1]
    assert "precision check: one step from the same weights and batch (CPU autocast, dropout off)" in output
    checked = table_rows(output, "matcher", "precision", "loss fp32")
    assert [row[:2] for row in checked] == [["scan_t2i_avg", "bf16"]]
    for row in checked:
        assert SCIENTIFIC.match(row[4]) and SCIENTIFIC.match(row[7]), row  # loss and grad norm compared with fp32
        assert float(row[5]) > 0 and float(row[6]) > 0  # finite gradient norms in both precisions


def _data_options(root: Path) -> list[str]:
    """The benchmark options that point at the trained matchers and the data of `root` (the fixture `repo`)."""
    return ["--models-dir", str(root / "models"), "--regions", str(root / "data/regions"),
            "--captions", str(root / "data/captions"), "--dataset", str(root / "data/raw/synthetic")]  # fmt: skip


@pytest.mark.slow
def test_precision_compares_bf16_and_fp16_scores_with_fp32(repo: Path) -> None:  # noqa: F811
    output = bench("precision", "--device", "cpu", "--models", "scan_t2i_avg", "cvse", "--images", "10",
                   *_data_options(repo))  # fmt: skip
    assert "the first 10 test images" in output and "skipped" not in output
    rows = table_rows(output, "matcher", "gallery", "precision", "score s", "max |Δscore|")
    assert [row[:3] for row in rows] == [
        [name, "10x50", precision] for name in ("scan_t2i_avg", "cvse") for precision in ("fp32", "bf16", "fp16")
    ]
    for row in rows:
        if row[2] == "fp32":
            assert row[4] == "-" and float(row[-1]) > 0  # rSum
        else:  # compared with the fp32 scores: the largest difference and the changes of R@K and rSum
            assert SCIENTIFIC.match(row[4]), row
            assert all(re.match(r"^[+-]\d+\.\d$", cell) for cell in row[5:]), row


@pytest.mark.slow
def test_search_shortlist_checks_the_search_path(repo: Path) -> None:  # noqa: F811
    output = bench("search_shortlist", "--models", "scan_t2i_avg", "scan_i2t_lse", "--shortlists", "5", "20",
                   "--timed-texts", "3", "--timed-images", "2", "--repeats", "1", *_data_options(repo))  # fmt: skip
    for name in ("scan_t2i_avg", "scan_i2t_lse"):
        assert f"{name} ({N_TEST_IMAGES} images x {5 * N_TEST_IMAGES} captions)" in output
    assert output.count(f"text queries ({5 * N_TEST_IMAGES}) -> images; timed on 3 queries") == 2
    assert output.count(f"image queries ({N_TEST_IMAGES}) -> captions; timed on 2 queries") == 2
    agreed = re.findall(r" (\d+)/(\d+)$", output, flags=re.MULTILINE)
    # per model and side, the timed rows, each checked against the matrices on the timed queries: the full score,
    # then the pooled and the chosen hard score, each alone and with each of the 2 shortlists
    assert len(agreed) == 2 * 2 * (1 + 2 * (1 + 2))
    assert all(int(total) in (2, 3) and int(same) <= int(total) for same, total in agreed)


@pytest.mark.slow
def test_startup_times_entry_points_here_and_in_another_revision() -> None:
    output = bench("startup", "--only", "tokenize", "itm", "--repeats", "1", "--against", "HEAD")
    references = [row[0] for row in table_rows(output, "reference", "seconds")]
    assert references == ["python", "torch", "torchvision", "mlflow"]
    rows = table_rows(output, "entry point", "help HEAD", "help now", "ratio")
    assert [row[0] for row in rows] == ["tokenize", "itm"]
    for row in rows:
        assert len(row) == 7 and row[3].endswith("x") and row[6].endswith("x")
        assert all(float(cell) > 0 for cell in (row[1], row[2], row[4], row[5]))


def test_quick_times_each_stage_to_the_next_and_the_last_to_the_end() -> None:
    from bench.quick import TOTAL, stage_seconds

    marks = [("download", 10.0), ("train@vsepp-0", 12.5), ("compare", 20.0)]
    seconds = stage_seconds(marks, started=4.0, ended=26.0)
    assert seconds == {"download": 2.5, "train@vsepp-0": 7.5, "compare": 6.0, TOTAL: 22.0}


@pytest.mark.slow
def test_run_all_runs_one_benchmark_and_records_it(repo: Path, tmp_path: Path) -> None:  # noqa: F811
    record = tmp_path / "RESULTS.md"
    options = ["--models", "vsepp", "--images", "5", *_data_options(repo)]
    output = bench("run_all", "--device", "cpu", "--only", "precision", "--record", str(record), "--options",
                   shlex.join(options))  # fmt: skip
    command = shlex.join(["python", "-m", "bench.precision", *options])  # precision has no CPU options of its own
    assert f"=== precision: {command}" in output
    rows = table_rows(output, "matcher", "gallery", "precision")
    assert [row[:3] for row in rows] == [["vsepp", "5x25", precision] for precision in ("fp32", "bf16", "fp16")]
    assert re.search(r"^all done in \d+ s$", output, flags=re.MULTILINE)  # and nothing FAILED
    assert output.rstrip().endswith(f"recorded in {record}")
    text = record.read_text()
    assert text.startswith("# Benchmark results\n")
    assert "- command: `python -m bench.run_all --device cpu --only precision --record " in text
    assert f"## precision\n\n`{command}` (" in text and "FAILED" not in text
    assert re.search(r"^vsepp\s+5x25\s+fp32\s", text, flags=re.MULTILINE)  # the table, recorded
    assert "## similarity" not in text  # only the benchmark run
