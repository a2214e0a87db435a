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


def _run(tmp_path, out, *extra):
    (tmp_path / "t.txt").write_text(TEXT)
    argv = ["train", "--text", str(tmp_path / "t.txt"), "--steps", "6", "--eval-interval", "3", "--out", str(out)]
    return main([*argv, *TINY, "--no-progress", *extra])


def test_non_empty_out_is_refused_without_overwrite(tmp_path, capsys):
    """A directory that holds files is never silently replaced: one line names it and --overwrite."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"an earlier run")
    assert _run(tmp_path, out) == 2
    assert "already holds files (model.safetensors); pass --overwrite" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == b"an earlier run"


def test_overwrite_replaces_the_run_files_and_keeps_others(tmp_path):
    """--overwrite: the run files are the new run's only (no mix of two runs); other files stay."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "loss.png").write_bytes(b"old plot")
    (out / "log.jsonl").write_text('{"step": 999, "loss": 1.0}\n' * 50)
    assert _run(tmp_path, out, "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine"
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert 999 not in steps and steps[0] == 0
    assert (out / "loss.png").read_bytes() != b"old plot" or not (out / "loss.png").exists()


def test_out_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert _run(tmp_path, tmp_path / "file" / "run") == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_ctrl_c_keeps_the_log_a_loadable_model_and_says_where(tmp_path, capsys, monkeypatch):
    """Ctrl-C at step 4: exit 130, one line, the log up to it, a loadable model, training.json saying so."""
    from tokenloss.models.bytegpt import ByteGPT
    from tokenloss.training import loop

    real = loop.next_byte_loss
    calls = []

    def interrupted(model, inputs, targets, **kwargs):
        if kwargs.get("reduction", "mean") == "mean":  # a training step, not an evaluation
            calls.append(1)
            if len(calls) == 5:
                raise KeyboardInterrupt
        return real(model, inputs, targets, **kwargs)

    monkeypatch.setattr(loop, "next_byte_loss", interrupted)
    out = tmp_path / "run"
    assert _run(tmp_path, out) == 130
    assert "Interrupted at step 4" in capsys.readouterr().err
    summary = json.loads((out / "training.json").read_text())
    assert summary["interrupted_at"] == 4 and summary["steps_run"] == 4
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [0, 3]
    ByteGPT.from_pretrained(out)  # loadable


def test_an_interrupted_save_leaves_the_previous_model(tmp_path, monkeypatch):
    """Files are renamed into place whole: a save that fails midway leaves the earlier model intact."""
    import safetensors.torch

    from tokenloss.models.bytegpt import ByteGPT, GPTConfig

    model = ByteGPT(GPTConfig(block_size=8, n_layer=1, n_head=1, n_embd=8))
    model.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def broken(state, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
