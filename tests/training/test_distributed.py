"""Two CPU processes (torchrun, gloo): every rank trains at the same k on every step, with no communication."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import phds
from phds.schedule import PHDSSchedule

WORKER = Path(__file__).with_name("_ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_two_ranks(tmp_path, k_sampling: str) -> list[dict]:
    records = tmp_path / "records"
    records.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(WORKER),
        str(tmp_path / "out"),
        str(records),
        k_sampling,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((records / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    return ranks


@pytest.mark.slow
def test_two_processes_train_at_the_same_k_on_every_step(tmp_path):
    ranks = _run_two_ranks(tmp_path, "global")
    expected = PHDSSchedule(ks=[1, 2, 3, 4], anchor_fraction=0.25, seed=0).sequence(4)
    for record in ranks:
        assert record["k_history"] == expected
        # 2 micro-batches per optimizer step, each at that step's k in every layer
        assert record["forward_ks"] == [[k, k] for k in expected for _ in range(2)]
    assert ranks[0]["validation_loss"] == ranks[1]["validation_loss"]  # gathered over both ranks
    assert phds.read_sidecar(tmp_path / "out").ks == [1, 2, 3, 4]


@pytest.mark.slow
def test_two_processes_with_layer_sampling_train_every_layer_at_the_same_k_on_every_step(tmp_path):
    ranks = _run_two_ranks(tmp_path, "layer")
    schedule = PHDSSchedule(ks=[1, 2, 3, 4], anchor_fraction=0.25, seed=0, sampling="layer")
    expected = [schedule.ks_at(step, 4, [0, 1]) for step in range(4)]
    assert any(ks[0] != ks[1] for ks in expected)
    for record in ranks:
        assert record["k_history"] == [{str(i): k for i, k in ks.items()} for ks in expected]
        assert record["forward_ks"] == [[ks[0], ks[1]] for ks in expected for _ in range(2)]
    assert phds.read_sidecar(tmp_path / "out").made_by["k_sampling"] == "layer"
