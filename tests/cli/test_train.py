"""Tests of ``tokenloss train``: a tiny end-to-end run, its outputs and summary, and clean errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tokenloss.cli import main

TINY = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16", "--batch-size", "4"]
TEXT = "The cat sat on the mat. The dog sat on the log. " * 30


@pytest.fixture(autouse=True)
def restore_threads():
    """The command sets torch's thread count; put it back for the other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_train_writes_model_log_plot_and_summary(tmp_path, capsys):
    """A 20-step run on a small file: every output exists and the summary says the start is log V."""
    pytest.importorskip("matplotlib")
    (tmp_path / "t.txt").write_text(TEXT)
    out = tmp_path / "run"
    argv = ["train", "--text", str(tmp_path / "t.txt"), "--steps", "20", "--eval-interval", "10", "--out", str(out)]
    assert main([*argv, *TINY, "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    assert "first loss 5.545 nats at step 0; log V = ln 256 = 5.545 -> as expected" in stdout
    assert "validation loss" in stdout and "bits/byte" in stdout and "perplexity" in stdout
    for name in ("config.json", "model.safetensors", "log.jsonl", "loss.png", "training.json"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and abs(records[0]["loss"] - math.log(256)) < 0.1
    assert {"val_loss", "lr", "tokens_per_s"} <= set(records[0])
    summary = json.loads((out / "training.json").read_text())
    assert summary["train_config"]["seed"] == 0
    assert summary["model"]["n_embd"] == 16 and summary["steps_run"] == 20


def test_train_json_output(tmp_path, capsys):
    """--json prints the summary as one JSON object."""
    (tmp_path / "t.txt").write_text(TEXT)
    assert main(["train", "--text", str(tmp_path / "t.txt"), "--steps", "3", *TINY, "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps_run"] == 3 and summary["first_loss"] == pytest.approx(math.log(256), abs=1e-4)


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        (None, [], "no such file"),
        ("too short", [], "too short to train on"),
        (TEXT, ["--steps", "0"], "steps must be >= 1"),
        (TEXT, ["--n-embd", "15"], "divisible by n_head"),
        (TEXT, ["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_train_errors_are_one_line(tmp_path, capsys, content, extra, message):
    """Bad input: exit status 2 and one 'Error:' line naming the problem, no traceback."""
    path = tmp_path / "t.txt"
    if content is not None:
        path.write_text(content)
    assert main(["train", "--text", str(path), *TINY, "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and message in err and "Traceback" not in err


def test_command_defaults_are_the_library_defaults():
    """The command's defaults are GPTConfig's and TrainConfig's, so the shipped model is 'the defaults'."""
    import inspect

    from tokenloss.cli.train import train_command
    from tokenloss.models.bytegpt import GPTConfig
    from tokenloss.training.loop import TrainConfig

    defaults = {name: p.default for name, p in inspect.signature(train_command).parameters.items()}
    model, config = GPTConfig(), TrainConfig()
    for name in ("block_size", "n_layer", "n_head", "n_embd"):
        assert defaults[name] == getattr(model, name), name
    for name in ("steps", "batch_size", "lr", "warmup_steps", "val_fraction", "eval_interval", "patience", "seed"):
        assert defaults[name] == getattr(config, name), name
    assert config.min_lr == pytest.approx(config.lr / 10)  # the command passes min_lr = lr / 10
