"""`kvtier serve` as a real process: config file plus environment overrides, a restart that keeps the chunks
of the disk tier, and scripts/run.sh with a config."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest
import torch

from kvtier.api import Client
from kvtier.bench.api import ServerProcess, free_port

from .helpers import KEYS, LAYOUT, kv_for, make_config, prompt


def test_restart_keeps_disk_chunks_per_tenant(tmp_path):
    config = make_config(tmp_path).model_dump(mode="json")
    env = {"KVTIER_SERVER__MAX_CHUNKS_PER_BATCH": "2"}  # overrides the file's 8
    C = LAYOUT.chunk_tokens
    tokens = prompt(5 * C, seed=11)
    kv = kv_for(len(tokens), seed=11)
    server = ServerProcess(config, env)
    try:
        with Client(server.url, LAYOUT, api_key=KEYS["alice"]) as alice:
            assert alice.put(tokens, kv).stored == 5
            stats = alice.stats()
            assert stats["requests"]["/v1/chunks"] == 3  # batches of 2
    finally:
        server.stop()
    server = ServerProcess(config, env)
    try:
        with Client(server.url, LAYOUT, api_key=KEYS["alice"]) as alice, \
                Client(server.url, LAYOUT, api_key=KEYS["bob"]) as bob:
            got = alice.get(tokens)  # re-attaches the layout the new process does not know yet
            assert got.tokens == 5 * C and torch.equal(got.kv, kv[:, :, :, : 5 * C])
            assert bob.lookup(tokens).tokens == 0
            assert alice.stats()["used_bytes"] == 5 * LAYOUT.chunk_bytes
    finally:
        server.stop()


@pytest.mark.parametrize("form", ["--config=FILE", "--config FILE"])
def test_run_sh_with_a_config_keeps_its_keys(tmp_path, form):
    """scripts/run.sh opens access only when no config is given, however ``--config`` is written."""
    path = tmp_path / "config.json"
    path.write_text(make_config(tmp_path).model_dump_json())
    port = free_port()
    config_args = [f"--config={path}"] if form == "--config=FILE" else ["--config", str(path)]
    proc = subprocess.Popen(["bash", "scripts/run.sh", *config_args, "--port", str(port), "--log-level", "warning"],
                            cwd=Path(__file__).resolve().parents[2])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "run.sh did not start the service"
            time.sleep(0.2)
        assert httpx.get(url + "/v1/stats").status_code == 401
        assert httpx.get(url + "/v1/stats", headers={"Authorization": f"Bearer {KEYS['alice']}"}).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
