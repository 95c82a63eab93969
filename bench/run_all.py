"""Run every benchmark of bench/ in turn, and optionally record their tables in a markdown file.

    python -m bench.run_all                                  # full sizes on a GPU; reduced sizes on a CPU
    python -m bench.run_all --record bench/RESULTS.md        # also write the tables, with device, date and commit
    python -m bench.run_all --only similarity training       # some of them
    python -m bench.run_all --only training --record bench/RESULTS.md --update   # re-run one, keep the others
    python -m bench.run_all --only similarity --options "--scale 0.01 --repeats 1"   # other sizes for one

Run from the repository root, inside the virtualenv: each benchmark runs as `python -m bench.<name>`.

With a GPU (`torch.cuda.is_available()`, or `--device cuda`) each benchmark runs at its full size on it
(similarity: Flickr30K and COCO 5K galleries, fp32/fp16/bf16; extraction: up to BUTD batch 8 in fp16/bf16;
training: the papers' sizes, fp32/bf16/fp16 and torch.compile; precision: the whole test split). Without one, the
CPU sizes keep the whole run to about a quarter of an hour on two idle cores: similarity at a tenth of the Flickr30K
gallery, fp32 and bf16 (CPU autocast), with the reference timed on 50 captions; extraction with 2 timed runs;
training at embed 256 / word 128 / batch 64; precision on 200 test images; the search shortlist timed on 20 text
and 5 image queries, shortlists of 10, 50 and 200; the quick profile once cold and once warm (7 minutes).
`--options "..."` appends options to these for the one benchmark chosen with `--only` (the later options win: a
quick check at other sizes). The exact command of each benchmark is printed (and recorded) above its output.

A benchmark that fails does not stop the others: its error output is printed (and recorded) and the exit status
is 1 at the end. The record starts with the device, the date, the git commit (`git rev-parse --short HEAD`) and,
on a CPU, a line saying that the GPU targets were not measured; it is rewritten after each benchmark, so an
interrupted run keeps what it measured, and `--update` fills in the rest later.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import REPO

TARGETS = (
    "SCAN and UARDA similarity over COCO 5K (5,000 x 25,000) <= 2 s (bench/similarity.py)",
    "a SCAN training epoch on Flickr30K (145,000 pairs) <= 30 s (bench/training.py)",
    "BUTD region extraction at 600x1000 >= 60 images/s (bench/extraction.py)",
)


@dataclass(frozen=True)
class Benchmark:
    name: str  # the module bench.<name>
    cpu: tuple[str, ...]  # options on a CPU
    cuda: tuple[str, ...]  # options on a GPU


BENCHMARKS = (
    Benchmark(
        "similarity",
        ("--scale", "0.1", "--reference-captions", "50", "--precisions", "fp32", "bf16"),
        ("--device", "cuda"),
    ),
    Benchmark("extraction", ("--repeats", "2"), ("--device", "cuda")),
    Benchmark("training", (), ("--device", "cuda", "--compile")),
    Benchmark("precision", (), ("--device", "cuda")),
    # the search path runs on the CPU in `itm search`; its benchmark has no device option
    Benchmark(
        "search_shortlist", ("--timed-texts", "20", "--timed-images", "5", "--shortlists", "10", "50", "200"), ()
    ),
    # start-up is import work on the CPU, the same with or without a GPU
    Benchmark("startup", (), ()),
    # the quick profile cold and warm (itm/prefork.py): ~7 min on two cores
    Benchmark("quick", (), ()),
)


@dataclass(frozen=True)
class Outcome:
    command: str
    output: str  # standard output (the tables)
    errors: str  # standard error, kept when the benchmark failed
    returncode: int
    seconds: float
    finished: datetime.datetime


def run(benchmark: Benchmark, device: str, extra: Sequence[str] = ()) -> Outcome:
    """Run one benchmark (`python -m bench.<name>` from the repository root, with the device's options and then
    `extra`), echoing its standard output as it comes; its standard error (progress bars) is kept and shown only
    when it fails."""
    options = [*(benchmark.cuda if device == "cuda" else benchmark.cpu), *extra]
    module = f"bench.{benchmark.name}"
    command = [sys.executable, "-m", module, *options]
    shown = shlex.join(["python", "-m", module, *options])
    print(f"\n=== {benchmark.name}: {shown}", flush=True)
    started = time.perf_counter()
    # its own session: a signal to the benchmark's process group ends that benchmark (recorded as failed), not the run
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    errors: list[str] = []
    drain = threading.Thread(target=lambda: errors.extend(process.stderr), daemon=True)  # type: ignore[arg-type]
    drain.start()
    lines = []
    for line in process.stdout:  # type: ignore[union-attr]
        print(line, end="", flush=True)
        lines.append(line)
    returncode = process.wait()
    drain.join()
    seconds = time.perf_counter() - started
    error_text = "".join(errors[-40:]) if returncode != 0 else ""
    if returncode != 0:
        print(f"--- {benchmark.name} FAILED (exit status {returncode}):\n{error_text}", flush=True)
    print(f"=== {benchmark.name}: {seconds:.0f} s", flush=True)
    finished = datetime.datetime.now(datetime.UTC)
    return Outcome(shown, "".join(lines), error_text, returncode, seconds, finished)


def describe_device(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return f"CPU: {_cpu_model()}, {torch.get_num_threads()} threads"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    """The short commit hash of the checkout (read-only git), or "unknown"."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def recorded_sections(path: Path) -> dict[str, str]:
    """The benchmark sections ("## name" to the next one) of an existing record, by name."""
    if not path.is_file():
        return {}
    parts = path.read_text(encoding="utf-8").split("\n## ")[1:]
    return {part.split("\n", 1)[0].strip(): "## " + part.rstrip("\n") + "\n" for part in parts}


def record(
    path: Path,
    device: str,
    outcomes: dict[str, Outcome],
    started: datetime.datetime,
    pending: list[str],
    kept: dict[str, str],
) -> None:
    """The markdown record: device, date, commit, whether the GPU targets were measured, then each benchmark in
    BENCHMARKS' order: those run now from `outcomes`, the others from `kept` (sections of an earlier record, with
    their own date). `pending` lists those not run yet: the record is rewritten after each benchmark, so an
    interrupted run keeps what it measured."""
    lines = [
        "# Benchmark results",
        "",
        f"- date: {started:%Y-%m-%d %H:%M} UTC",
        f"- device: {describe_device(device)}",
        f"- git commit: {git_commit()} (the working tree may hold uncommitted changes)",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- command: `{shlex.join(['python', '-m', 'bench.run_all', *sys.argv[1:]])}`",
        "",
    ]
    if device != "cuda":
        lines += [
            "**No GPU was available for these figures: they were measured on the CPU at reduced sizes, and the GPU "
            "targets are unmeasured:**",
            "",
            *[f"- {target} on one H100" for target in TARGETS],
            "",
            "CPU timings come from a machine shared with other work and are noisy; they show that the benchmarks "
            "run, not how fast the code is on a GPU.",
            "",
        ]
    if pending:
        lines += [f"**Incomplete run: not run (yet): {', '.join(pending)}.**", ""]
    for name in [benchmark.name for benchmark in BENCHMARKS]:
        if name not in outcomes:
            lines += [kept[name]] if name in kept else []
            continue
        outcome = outcomes[name]
        status = "" if outcome.returncode == 0 else f", FAILED (exit status {outcome.returncode})"
        when = f"{outcome.finished:%Y-%m-%d %H:%M} UTC"
        lines += [f"## {name}", "", f"`{outcome.command}` ({outcome.seconds:.0f} s, {when}{status})", "", "```text"]
        lines += [outcome.output.rstrip("\n")]
        if outcome.errors:
            lines += ["--- error output (last lines):", outcome.errors.rstrip("\n")]
        lines += ["```", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def _relative(path: Path) -> str:
    resolved = path.resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run_all", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    names = [benchmark.name for benchmark in BENCHMARKS]
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    parser.add_argument("--only", nargs="+", choices=names, help="run these benchmarks only")
    parser.add_argument("--record", type=Path, help="write the output to this markdown file")
    keep = "with --record: keep the sections of the benchmarks not run now from the existing record"
    parser.add_argument("--update", action="store_true", help=keep)
    parser.add_argument("--options", help="with --only and one benchmark: options added to its own, in one "
                        'argument (e.g. --options "--scale 0.01 --repeats 1")')  # fmt: skip
    args = parser.parse_args()
    extra = shlex.split(args.options or "")
    if extra and (args.only is None or len(set(args.only)) != 1):
        parser.error("--options goes with --only and one benchmark")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    started = datetime.datetime.now(datetime.UTC)
    print(f"device: {describe_device(device)}; {'full' if device == 'cuda' else 'reduced CPU'} sizes")
    chosen = [benchmark for benchmark in BENCHMARKS if args.only is None or benchmark.name in args.only]
    kept = recorded_sections(args.record) if args.record and args.update else {}
    outcomes: dict[str, Outcome] = {}
    for done, benchmark in enumerate(chosen, start=1):
        outcomes[benchmark.name] = run(benchmark, device, extra)
        if args.record:
            record(args.record, device, outcomes, started, [later.name for later in chosen[done:]], kept)
    total = sum(outcome.seconds for outcome in outcomes.values())
    failed = [name for name, outcome in outcomes.items() if outcome.returncode != 0]
    print(f"\nall done in {total:.0f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    if args.record:
        print(f"recorded in {_relative(args.record)}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
