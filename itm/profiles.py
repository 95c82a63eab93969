"""Profiles: named sets of params.yaml overrides, run as their own DVC experiment without touching the workspace.

A profile is a YAML file shaped like params.yaml, holding only the keys it changes; under `matchers`, the key `"*"`
stands for every matcher block of params.yaml. `run_profile` checks the profile against the params schema, then runs

    dvc exp run --temp -n <profile>-<UTC time> -S <key>=<value> ...

in the repository: every stage runs in a temporary copy, the results become the DVC experiment `<profile>-<time>`
(`dvc exp show`, `dvc exp apply <name>`), the MLflow runs carry the tag `itm.dvc_exp_name`, and the workspace
(params.yaml, dvc.lock, models/, metrics/, reports/) keeps the default results. The headline table of the
experiment's comparison is printed at the end. The stages start warm, as forks of one process that has imported the
libraries (itm/prefork.py); `--cold` starts each in a fresh interpreter.

    python -m itm.profiles profiles/quick.yaml          # what `make quick` runs
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from itm.config import PARAMS_FILE, parse_params, read_yaml
from itm.errors import UserError
from itm.prefork import warm_stages
from itm.stage_runner import run_stage
from itm.tracking import flatten

EVERY_MATCHER = "*"
REPORT = "reports/comparison.md"


def read_profile(path: Path) -> dict[str, Any]:
    """The overrides of the profile at `path` (a mapping shaped like params.yaml), read as params.yaml is (UTF-8,
    no key written twice)."""
    profile = read_yaml(path, what="profile")
    if not isinstance(profile, dict) or not profile:
        raise UserError(f"{path}: expected a mapping of params.yaml keys to override")
    return profile


def expand_matchers(profile: Mapping[str, Any], matchers: Sequence[str]) -> dict[str, Any]:
    """The profile with `matchers: {"*": {...}}` given to every matcher of `matchers` (a matcher's own entry in the
    profile is applied after it)."""
    expanded = dict(profile)
    blocks = dict(expanded.get("matchers") or {})
    shared = blocks.pop(EVERY_MATCHER, None)
    if shared is not None:
        blocks = {name: {**shared, **blocks.get(name, {})} for name in {*matchers, *blocks}}
    if blocks:
        expanded["matchers"] = dict(sorted(blocks.items()))
    return expanded


def applied(params: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `params` with every leaf of `overrides` set; a key params.yaml does not have is a mistake."""
    result = json.loads(json.dumps(params))
    for dotted, value in flatten(overrides).items():
        node = result
        *parents, last = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise UserError(f"profile key {dotted}: params.yaml has no section {part!r} there")
            node = node[part]
        if last not in node:
            raise UserError(f"profile key {dotted}: params.yaml has no such key")
        node[last] = value
    return result


def set_flags(overrides: Mapping[str, Any]) -> list[str]:
    """`-S key=value` arguments of `dvc exp run` for every leaf (values in JSON, which DVC's override grammar reads:
    numbers, true/false, null, lists; strings quoted)."""
    flags = []
    for dotted, value in flatten(overrides).items():
        flags += ["-S", f"{dotted}={json.dumps(value)}"]
    return flags


def experiment_name(profile: Path, now: datetime.datetime | None = None) -> str:
    stamp = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y%m%d-%H%M%S")
    return f"{profile.stem}-{stamp}"


def run_profile(profile_path: Path, params_path: Path = PARAMS_FILE, warm: bool = True) -> str:
    """Check the profile against the schema, run it as a temporary DVC experiment and print its comparison table;
    returns the experiment's name. `warm`: each stage runs in a fork of one process that has imported the libraries
    (itm/prefork.py), instead of importing them itself."""
    params = read_yaml(params_path)
    if not isinstance(params, dict):
        raise UserError(f"{params_path}: expected a mapping of sections at the top level")
    overrides = expand_matchers(read_profile(profile_path), list(params.get("matchers") or {}))
    parse_params(applied(params, overrides), source=f"{params_path} with {profile_path}")  # its mistakes, named
    name = experiment_name(profile_path)
    command = ["dvc", "exp", "run", "--temp", "-n", name, *set_flags(overrides)]
    print(f"running the profile {profile_path} as the DVC experiment {name} (the workspace is left as it is)")
    with warm_stages() if warm else contextlib.nullcontext(None) as environment:
        done = subprocess.run(command, env=environment)
    if done.returncode != 0:
        raise UserError(f"the experiment {name} failed (its stages' errors are above)")
    print(headline_table(name))
    return name


def headline_table(name: str) -> str:
    """The first table of the experiment's reports/comparison.md (the headline figures), from its git commit."""
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], capture_output=True, text=True)
    ref = next((line for line in refs.stdout.splitlines() if line.rsplit("/", 1)[-1] == name), None)
    if ref is None:
        return f"the experiment {name} ran; `dvc exp show` lists it"
    shown = subprocess.run(["git", "show", f"{ref}:{REPORT}"], capture_output=True, text=True)
    lines = shown.stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if shown.returncode != 0 or start is None:
        return f"the experiment {name} ran; its {REPORT}: git show {ref}:{REPORT}"
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join([f"{REPORT} of {name} (all of it: git show {ref}:{REPORT}):", *lines[start:end]])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", type=Path, help="a profile file, e.g. profiles/quick.yaml")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    parser.add_argument(
        "--cold", action="store_true", help="each stage imports its libraries itself (no warm process to fork)"
    )
    args = parser.parse_args(argv)
    run_profile(args.profile, args.params, warm=not args.cold)


if __name__ == "__main__":
    run_stage(main, sys.argv[1:])
