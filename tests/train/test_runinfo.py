"""Run directory naming, env.json and config.yaml."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from attanchor.train.runinfo import (
    collect_env,
    git_state,
    run_dir_for,
    sha256_file,
    write_run_info,
)


def test_run_dir_for():
    assert run_dir_for("runs", "demo", "none", 0) == Path("runs/demo/none-seed0")
    assert run_dir_for(Path("/r"), "tinyllava-1b/lora", "text_into_image", 3) == Path(
        "/r/tinyllava-1b/lora/text_into_image-seed3")
    for recipe, strategy in [("../x", "none"), ("/abs", "none"), ("a b", "none"),
                             ("demo", "a/b"), ("demo", "..")]:
        with pytest.raises(ValueError, match="letters, digits"):
            run_dir_for("runs", recipe, strategy, 0)
    with pytest.raises(ValueError, match="seed"):
        run_dir_for("runs", "demo", "none", "0")


def test_sha256_matches_hashlib(tmp_path):
    f = tmp_path / "train.json"
    f.write_bytes(b"abc")
    # the FIPS 180-2 test vector for "abc"
    assert sha256_file(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * 10_000)
    assert sha256_file(big, chunk_size=4096) == hashlib.sha256(big.read_bytes()).hexdigest()


def test_collect_env(tmp_path):
    f = tmp_path / "val.json"
    f.write_text("[]")
    env = collect_env([f])
    assert env["data_files"] == {str(f): {"sha256": hashlib.sha256(b"[]").hexdigest(),
                                          "bytes": 2}}
    import peft
    import torch
    import transformers

    assert env["packages"]["torch"] == torch.__version__
    assert env["packages"]["transformers"] == transformers.__version__
    assert env["packages"]["peft"] == peft.__version__
    assert set(env["packages"]) >= {"lightning", "deepspeed", "bitsandbytes", "wandb"}
    assert env["python"].count(".") == 2
    json.dumps(env)  # JSON-able


def test_collect_env_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        collect_env([tmp_path / "nope.json"])
    with pytest.raises(FileNotFoundError, match="not a file"):
        collect_env([tmp_path])


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_state(tmp_path):
    assert git_state(tmp_path) is None  # not a repository
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (repo / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-q", "-m", "one")
    sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert git_state(repo) == {"commit": sha, "dirty": False}
    (repo / "runs.log").write_text("untracked output\n")
    assert git_state(repo)["dirty"] is False  # untracked files do not count
    (repo / "a.py").write_text("x = 2\n")
    assert git_state(repo) == {"commit": sha, "dirty": True}


def test_write_run_info(tmp_path):
    data = tmp_path / "train.json"
    data.write_text('[{"id": "1"}]')
    run_dir = run_dir_for(tmp_path / "runs", "demo", "text_into_image", 0)
    config = {
        "seed_everything": 0,
        "model": {"model_path": Path("/models/tiny"), "optim": {"betas": (0.9, 0.999)}},
        "trainer": {"max_steps": 10, "precision": "32-true", "callbacks": None},
    }
    env = write_run_info(run_dir, config, [data], repo_dir=tmp_path)
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == {
        "seed_everything": 0,
        "model": {"model_path": "/models/tiny", "optim": {"betas": [0.9, 0.999]}},
        "trainer": {"max_steps": 10, "precision": "32-true", "callbacks": None},
    }
    on_disk = json.loads((run_dir / "env.json").read_text())
    assert on_disk == env
    assert on_disk["data_files"][str(data)]["sha256"] == sha256_file(data)
    assert on_disk["git"] is None  # tmp_path is no repository
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "env.json"]


def test_write_run_info_rejects_objects(tmp_path):
    with pytest.raises(TypeError, match=r"config\.model\.anchor: object"):
        write_run_info(tmp_path, {"model": {"anchor": object()}}, [])
    assert not (tmp_path / "config.yaml").exists()
