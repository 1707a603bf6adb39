"""The CLI on a real model: ingest, ls, show, verify, rm, gc, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests._cli import run_cli as run
from weightatlas.storage import Store


def wa(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "weightatlas.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=120)


@pytest.fixture
def ingested(tmp_path: Path, digits_checkpoints: list[str], capsys) -> str:
    root = str(tmp_path / "store")
    code, out, err = run(capsys, "--store", root, "ingest", "--model", "digits",
                         *digits_checkpoints)
    assert code == 0, err
    assert out.count("ingested") == 3
    return root


def test_ingest_many_checkpoints_takes_steps_from_paths(ingested: str, capsys):
    code, out, _ = run(capsys, "--store", ingested, "ls", "digits", "--json")
    assert code == 0
    listed = json.loads(out)
    assert [s["ref"] for s in listed] == ["digits@1", "digits@10", "digits@60"]
    assert all(s["framework"] == "safetensors" and s["n_tensors"] == 6 for s in listed)
    assert listed[0]["n_params"] == 64 * 64 + 64 + 32 * 64 + 32 + 10 * 32 + 10
    code, out, _ = run(capsys, "--store", ingested, "ls")
    assert "digits" in out and "digits@60" in out


def test_show_snapshot_and_tensor_match_the_checkpoint(ingested: str, digits_checkpoints,
                                                       capsys):
    from safetensors.numpy import load_file

    reference = load_file(digits_checkpoints[-1])
    code, out, _ = run(capsys, "--store", ingested, "show", "digits", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["snapshot"] == "digits@60"
    by_name = {t["name"]: t for t in doc["tensors"]}
    w = reference["fc1.weight"].astype(np.float64)
    assert by_name["fc1.weight"]["shape"] == [64, 64]
    assert by_name["fc1.weight"]["kind"] == "linear"
    assert by_name["fc1.weight"]["std"] == pytest.approx(w.std(), rel=1e-12)
    assert by_name["fc1.weight"]["l2"] == pytest.approx(np.linalg.norm(w), rel=1e-12)
    code, out, _ = run(capsys, "--store", ingested, "show", "digits@1", "fc2.bias", "--json")
    info = json.loads(out)
    ref1 = load_file(digits_checkpoints[0])["fc2.bias"].astype(np.float64)
    assert info["abs_max"] == pytest.approx(np.abs(ref1).max())
    code, out, _ = run(capsys, "--store", ingested, "show", "digits@10", "fc3.weight")
    assert code == 0 and "fc3.weight" in out and "[out, in]" in out and "[[" in out


def test_verify_reports_damage_and_exits_1(ingested: str, capsys):
    code, out, _ = run(capsys, "--store", ingested, "verify")
    assert code == 0 and out.count(": ok") == 3
    path = Store(ingested).path("digits", 10)
    raw = bytearray(Path(path).read_bytes())
    raw[len(raw) // 2] ^= 1
    Path(path).write_bytes(bytes(raw))
    code, out, _ = run(capsys, "--store", ingested, "verify", "--json")
    assert code == 1
    results = {r["snapshot"]: r for r in json.loads(out)}
    assert results["digits@1"]["ok"] and results["digits@60"]["ok"]
    assert not results["digits@10"]["ok"]


def test_rm_snapshot_then_model(ingested: str, capsys):
    code, out, _ = run(capsys, "--store", ingested, "rm", "digits@10")
    assert code == 0 and "step-10.arrow" in out
    assert [i.ref for i in Store(ingested).snapshots()] == ["digits@1", "digits@60"]
    code, _, _ = run(capsys, "--store", ingested, "rm", "digits")
    assert code == 0 and Store(ingested).models() == []


def test_ingest_twice_and_overwrite(tmp_path: Path, digits_checkpoints, capsys):
    root = str(tmp_path / "s")
    a, b = digits_checkpoints[0], digits_checkpoints[1]
    assert run(capsys, "--store", root, "ingest", a, "--model", "m", "--step", "5")[0] == 0
    assert run(capsys, "--store", root, "ingest", a, "--model", "m", "--step", "5")[0] == 0
    code, _, err = run(capsys, "--store", root, "ingest", b, "--model", "m", "--step", "5")
    assert code == 1
    assert err.startswith("error: ") and "already exists with different tensors" in err
    assert run(capsys, "--store", root, "ingest", b, "--model", "m", "--step", "5",
               "--overwrite")[0] == 0
    code, out, _ = run(capsys, "--store", root, "ingest", a, "--model", "m", "--tag", "best")
    assert code == 0 and "m@best" in out


def test_errors_are_one_line_without_traceback(tmp_path: Path):
    missing = tmp_path / "nope.safetensors"
    result = wa("--store", str(tmp_path / "s"), "ingest", str(missing))
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("error: ") and str(missing) in result.stderr
    assert "Traceback" not in result.stderr
    unknown = tmp_path / "weights.xyz"
    unknown.write_bytes(b"hello")
    result = wa("--store", str(tmp_path / "s"), "ingest", str(unknown))
    assert result.returncode == 1 and "weights.xyz" in result.stderr
    assert "Traceback" not in result.stderr
    debug = wa("--store", str(tmp_path / "s"), "--debug", "ingest", str(missing))
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_store_from_environment_and_missing_store(tmp_path: Path, digits_checkpoints):
    env = {"WEIGHTATLAS_STORE": str(tmp_path / "envstore")}
    assert wa("ingest", digits_checkpoints[0], env=env).returncode == 0
    listed = wa("ls", "--json", env=env)
    assert [m["model"] for m in json.loads(listed.stdout)] == ["model"]
    result = wa("--store", str(tmp_path / "absent"), "ls")
    assert result.returncode == 1 and "no weightatlas store here" in result.stderr


def test_show_unknown_names(ingested: str, capsys):
    code, _, err = run(capsys, "--store", ingested, "show", "digits@7")
    assert code == 1 and "no snapshot digits@7" in err and "digits@1" in err
    code, _, err = run(capsys, "--store", ingested, "show", "digits", "fc9.weight")
    assert code == 1 and "no tensor 'fc9.weight'" in err


def test_ingest_shows_a_progress_bar_with_bytes_per_second(tmp_path: Path, monkeypatch,
                                                           capsys):
    import io
    import re

    from rich.console import Console

    from weightatlas import cli
    from weightatlas.adapters import safetensors

    path = tmp_path / "big.safetensors"
    rng = np.random.default_rng(0)
    safetensors.write({f"l{i}.weight": rng.standard_normal((256, 256)).astype(np.float32)
                       for i in range(16)}, path)
    screen = io.StringIO()
    monkeypatch.setattr(cli, "err", Console(file=screen, force_terminal=True, width=120))
    code, out, _ = run(capsys, "--store", str(tmp_path / "s"), "ingest", str(path))
    assert code == 0 and "ingested" in out
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert "checking big.safetensors" in shown and "writing  big.safetensors" in shown
    assert re.search(r"\d+(\.\d+)? [kMG]?B/s", shown), shown[-500:]


def test_help_keeps_brackets_literal(capsys):
    """Help text is plain: snapshot syntax and defaults keep their brackets."""
    code, out, _ = run(capsys, "compare", "--help")
    assert code == 0 and "MODEL[@STEP|@TAG]" in out
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "[default: ./weightatlas_store]" in " ".join(out.split())
    for command in ("saliency", "gradients", "expand"):
        assert command in out
