"""The numeric environment: stages pin the CPU kernels and threads before torch loads, and record what they ran on."""

from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from itm import environment
from tests.conftest import REPO

X86 = platform.machine().lower() in ("x86_64", "amd64")


def test_a_stage_process_runs_the_pinned_kernels_and_threads() -> None:
    probe = "import stages, torch, json; from itm import environment; from itm.device import default_device; "
    probe += "default_device(); "
    probe += "print(json.dumps(environment.record()))"
    env = {key: value for key, value in os.environ.items() if key not in environment.X86_PINS}
    env.pop(environment.THREADS_VARIABLE, None)
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    record = json.loads(done.stdout)
    assert record["threads"] == environment.DEFAULT_THREADS and record["torch"] == torch.__version__
    if X86:  # every x86-64 CPU this runs on has AVX2; other machines keep their own kernels
        assert (record["cpu_capability"], record["onednn_max_isa"], record["mkl_cbwr"]) == ("AVX2", "AVX2", "AVX2")


def test_a_kernel_already_set_is_kept_and_the_threads_follow_itm_cpu_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    monkeypatch.setenv(environment.THREADS_VARIABLE, "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "8")  # overridden: ITM_CPU_THREADS is the one knob of the count
    for name in (*environment.X86_PINS, "MKL_NUM_THREADS"):  # restored after the test
        if name != "ATEN_CPU_CAPABILITY":
            monkeypatch.delenv(name, raising=False)
    environment.pin()
    assert os.environ["ATEN_CPU_CAPABILITY"] == "default"
    assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "3" and environment.cpu_threads() == 3


def test_the_itm_command_runs_the_pinned_threads() -> None:
    """`itm` is not a stage: its entry point pins the environment itself, before its lazy torch import."""
    probe = "import sys, json; from itm import commands; sys.argv = ['itm', '--help']\n"
    probe += "try:\n    commands.main()\nexcept SystemExit:\n    pass\n"
    probe += "import os; print(json.dumps([os.environ['OMP_NUM_THREADS'], sorted(set(sys.modules) & {'torch'})]))"
    env = {key: value for key, value in os.environ.items() if key not in environment.THREAD_VARIABLES}
    env[environment.THREADS_VARIABLE] = "3"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.splitlines()[-1]) == ["3", []]  # pinned, and torch not loaded yet


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_thread_count_is_named(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(environment.THREADS_VARIABLE, value)
    with pytest.raises(ValueError, match=rf"ITM_CPU_THREADS={value!r}: expected a whole number of threads"):
        environment.cpu_threads()


def test_the_record_names_versions_kernels_threads_and_gpus() -> None:
    record = environment.record()
    assert set(record) >= {"torch", "cuda", "cpu", "cpu_capability", "threads", "gpus"}
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["gpus"] == [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    json.dumps(record)  # it goes into cards and MLflow as JSON


def test_a_process_without_torch_records_its_version_without_loading_it() -> None:
    """The download and tokenize stages never load torch: their record (the tags of their MLflow runs) names torch's
    installed version and leaves what torch would choose empty, instead of spending seconds importing it."""
    probe = "import sys, json; from itm import environment; record = environment.record(); "
    probe += "print(json.dumps([record, 'torch' in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    record, loaded = json.loads(done.stdout)
    assert not loaded and record["torch"] == torch.__version__.split("+")[0]
    assert [record[key] for key in ("cuda", "cudnn", "cpu_capability", "threads", "gpus")] == [None] * 5
    assert list(record) == list(environment.record())  # the same keys, in the same order, as with torch loaded


def test_the_record_loads_back_from_a_weights_only_checkpoint() -> None:
    """Cards travel inside model.pt, which is read with weights_only=True: the record holds plain values only."""
    buffer = io.BytesIO()
    torch.save({"card": {"environment": environment.record()}}, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["card"]["environment"] == environment.record()
