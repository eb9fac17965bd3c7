"""`kvtier serve` and `kvtier demo` refuse what cannot start with one line saying what was wrong, exit 2, no
traceback (real subprocesses, real files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def kvtier(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m kvtier.cli ARGV`` with the caller's environment less its KVTIER_* variables (plus ``env``)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}
    return subprocess.run([sys.executable, "-m", "kvtier.cli", *argv], capture_output=True, text=True, timeout=60,
                          env={**clean, **(env or {})})


def assert_refused(out: subprocess.CompletedProcess, command: str, why: str) -> None:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert lines[-1].startswith(f"kvtier {command}") and why in lines[-1], out.stderr


def host(**extra) -> dict:
    return {"kind": "host", "capacity_bytes": 100_000_000, **extra}


@pytest.mark.parametrize(("config", "why"), [
    ([], "must hold a JSON object"),
    (b'{"open_access": true}\xff\n', "cannot read config file"),
    ({"tiers": [{"kind": "disk", "capacity_bytes": 100_000_000, "path": "{tmp}/afile"}]}, "Not a directory"),
    ({"tiers": [{"kind": "disk", "capacity_bytes": 100_000_000, "path": "/proc/kvtier"}]}, "/proc/kvtier"),
    ({"tiers": [host(codec="int3")]}, "tiers.0.codec: Value error, unknown codec 'int3'"),
    ({"tiers": [host(polcy="lfu")]}, "tiers.0.polcy: Extra inputs are not permitted"),
    ({"tiers": [host()], "server": {"prot": 9001}}, "server.prot: Extra inputs are not permitted"),
    ({"tiers": [host()], "tenants": [{"name": "a", "key_sha256": "0" * 64, "quota": 5}]}, "tenants.0.quota"),
    ({"tiers": [{"kind": "redis", "capacity_bytes": 100_000_000, "url": "redis://127.0.0.1:1/0"}]},
     "Connection refused"),
    ({"tiers": [{"kind": "redis", "capacity_bytes": 100_000_000, "url": "localhost:6379"}]}, "Redis URL"),
])
def test_serve_refuses_a_config_that_cannot_start(tmp_path, config, why):
    (tmp_path / "afile").touch()
    path = tmp_path / "config.json"
    if isinstance(config, bytes):
        path.write_bytes(config)
    else:
        if isinstance(config, dict):
            config = {"open_access": True, **config}
        path.write_text(json.dumps(config).replace("{tmp}", str(tmp_path)))
    assert_refused(kvtier("serve", "--config", str(path), "--port", "0"), "serve", why)


def test_serve_refuses_a_misspelt_nested_environment_variable(tmp_path):
    out = kvtier("serve", "--port", "0", env={"KVTIER_OPEN_ACCESS": "true", "KVTIER_SERVER__PROT": "9001",
                                              "XDG_CACHE_HOME": str(tmp_path)})
    assert_refused(out, "serve", "server.prot: Extra inputs are not permitted")


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_serve_refuses_a_port_out_of_range(port):
    out = kvtier("serve", "--port", port)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "kvtier serve: error: argument --port" in out.stderr


def test_demo_refuses_a_disk_folder_that_is_a_file(tmp_path):
    (tmp_path / "afile").touch()
    assert_refused(kvtier("demo", "--disk-dir", str(tmp_path / "afile")), "demo", "Not a directory")
