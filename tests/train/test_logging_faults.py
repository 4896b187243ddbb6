"""Logging faults: W&B failing to start or to write never stops a run (metrics.csv keeps every
step, one warning says so), and secrets set in the environment never reach the run directory
or the console. Real faults, through the real CLI and the real wandb library."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

from attanchor.train.cli import build_cli
from attanchor.train.logging_faults import FailSafeWandbLogger, redact
from tests.conftest import world_overrides

DEMO = str(Path(__file__).resolve().parents[2] / "recipes" / "demo" / "anchored.yaml")
SECRETS = {"WANDB_API_KEY": "7a3f9c1e" * 5,  # 40 characters, the shape of a W&B key
           "HF_TOKEN": "hf_H2secretTokenValue8f2c91d4e7",
           "HUGGING_FACE_HUB_TOKEN": "hf_H2otherHubToken3b6a0c5d9e1f"}


@pytest.fixture(autouse=True)
def no_wandb_run():
    """Lightning's WandbLogger reuses a run left open in the process: start each test clean."""
    import wandb

    wandb.finish()
    yield
    wandb.finish()


def fit(world, run_root: Path, *extra: str, callbacks: list | None = None):
    argv = ["fit", "--config", DEMO, *world_overrides(world, run_root),
            "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "1",
            "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "1",
            "--data.batch_size", "4", "--data.eval_batch_size", "4", *extra]
    if callbacks:
        from attanchor.data.datamodule import VLMDataModule
        from attanchor.train.cli import AttanchorCLI
        from attanchor.train.module import AnchorModule
        from attanchor.train.recipe import expand_config_args

        return AttanchorCLI(AnchorModule, VLMDataModule, args=expand_config_args(argv),
                            save_config_callback=None, seed_everything_default=0,
                            trainer_defaults={"deterministic": "warn", "callbacks": callbacks},
                            parser_kwargs={"default_env": False})
    return build_cli(argv)


def steps_logged(run_dir: Path) -> list[int]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


def wandb_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "W&B logging failed" in str(w.message)]


def test_redact():
    env = {"HF_TOKEN": "hf_abcdef", "WANDB_API_KEY": "k"}
    assert redact("token hf_abcdef, key k", env) == "token ***, key k"


def test_wandb_failing_to_start_leaves_csv_and_one_warning(tiny_world, tmp_path):
    run = tmp_path / "demo" / "text_into_image-seed0"
    run.mkdir(parents=True)
    (run / "wandb").write_text("a file where W&B wants its folder\n")  # wandb.init: OSError
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cli = fit(tiny_world, tmp_path)
    assert cli.trainer.state.finished and cli.trainer.global_step == 4
    assert steps_logged(run) == [0, 1, 2, 3]
    [wb] = [lg for lg in cli.trainer.loggers if isinstance(lg, FailSafeWandbLogger)]
    assert wb.failure.startswith("start: NotADirectoryError:"), wb.failure
    said = wandb_warnings(record)
    assert len(said) == 1, said
    assert f"training continues and logs to {run / 'metrics.csv'} only" in said[0]


class FinishWandbAt(Callback):
    """At batch ``at``, W&B's run ends under the logger (as when its process dies): every
    later write raises ``wandb.errors.UsageError`` inside the library."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.at:
            import wandb

            wandb.run.finish()


def test_wandb_failing_to_write_leaves_csv_and_one_warning(tiny_world, tmp_path):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cli = fit(tiny_world, tmp_path, callbacks=[FinishWandbAt(2)])
    run = tmp_path / "demo" / "text_into_image-seed0"
    assert cli.trainer.state.finished and cli.trainer.global_step == 4
    assert steps_logged(run) == [0, 1, 2, 3]
    [wb] = [lg for lg in cli.trainer.loggers if isinstance(lg, FailSafeWandbLogger)]
    assert wb.failure.startswith("log_metrics: UsageError:"), wb.failure
    assert len(wandb_warnings(record)) == 1, wandb_warnings(record)
    assert list((run / "wandb").glob("offline-run-*"))  # it did start and write


def test_secrets_never_reach_the_run_directory_or_the_console(tiny_world, tmp_path,
                                                              monkeypatch, capfd):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    cli = fit(tiny_world, tmp_path)
    assert cli.trainer.state.finished
    run = tmp_path / "demo" / "text_into_image-seed0"
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    for must in ("env.json", "config.yaml", "run.json", "metrics.csv", "last.ckpt"):
        assert must in names, f"{must} missing: the grep below would prove nothing"
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb")), "no W&B run to grep"
    out = capfd.readouterr()
    blobs = {str(p): p.read_bytes() for p in files}
    blobs["<stdout>"], blobs["<stderr>"] = out.out.encode(), out.err.encode()
    for where, data in blobs.items():
        for name, value in SECRETS.items():
            assert value.encode() not in data, f"{name} leaked into {where}"
    assert len(files) >= 10, sorted(names)
