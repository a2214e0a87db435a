"""Tests of `tokenloss eval`: options reach the library, output modes, reports, stdin, torchrun, and bad input."""

from __future__ import annotations

import codecs
import io
import json
import os
import subprocess
import sys
import this

import pytest
import torch

import tokenloss.evaluation.scoring
import tokenloss.models
from tokenloss.cli import main
from tokenloss.evaluation.scoring import evaluate
from tokenloss.models import load_model
from tokenloss.models.bytegpt import ByteGPT, GPTConfig

ZEN = codecs.decode(this.s, "rot13")
JSON_KEYS = {"tokens", "loss_nats", "perplexity", "bits_per_token", "bits_per_byte", "accuracy", "ece", "log_vocab"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random ByteGPT saved to a directory (context 32)."""
    torch.manual_seed(0)
    module = ByteGPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=16))
    torch.nn.init.normal_(module.lm_head.weight, std=0.5)
    return module.save_pretrained(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "zen.txt"
    path.write_text(ZEN, encoding="utf-8")
    return path


def run(capsys, *args):
    code = main(["eval", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_has_the_numbers_of_evaluate(model_dir, text_file, capsys):
    """--json prints one JSON object whose numbers are evaluate()'s, with the required keys."""
    code, out, err = run(capsys, "--model", str(model_dir), "--text", str(text_file), "--json", "--stride", "8")
    assert code == 0, err
    assert out.count("\n") == 1
    result = json.loads(out)
    assert JSON_KEYS <= set(result)
    expected = evaluate(load_model(model_dir), ZEN, stride=8).result
    for key in ("tokens", "bytes", "words", "num_windows", "max_length", "stride"):
        assert result[key] == expected[key], key
    for key in JSON_KEYS - {"tokens"}:
        assert result[key] == pytest.approx(expected[key], rel=1e-6), key
    assert result["tokens"] == len(ZEN.encode()) - 1 and result["bos"] is False
    assert result["first_token"]["scored"] is False and result["dtype"] == "float32"


def test_table_labels_every_normalisation(model_dir, text_file, capsys):
    """The table names the token-, byte- and word-normalised numbers and log V, and reports the first token."""
    code, out, err = run(capsys, "--model", str(model_dir), "--text", str(text_file), "-q")
    assert code == 0, err
    for label in ("perplexity", "bits per token", "bits per byte", "byte perplexity", "word perplexity", "ECE"):
        assert label in out
    assert "log V" in out and "5.5452" in out and "not scored" in out and "BOS      no" in out
    assert "scoring" not in err  # -q: no progress bar


def test_progress_bar_goes_to_stderr(model_dir, text_file, capsys):
    """Without -q a tqdm bar counts the scored tokens on stderr; stdout keeps only the table."""
    code, out, err = run(capsys, "--model", str(model_dir), "--text", str(text_file))
    assert code == 0 and "tok/s" in err and "tok/s" not in out


@pytest.mark.parametrize("args", [["--text", "-"], []])
def test_reads_stdin(model_dir, monkeypatch, capsys, args):
    """--text - or no --text reads the text from stdin."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Hello, stdin!")))
    code, out, err = run(capsys, "--model", str(model_dir), *args, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["tokens"] == len("Hello, stdin!") - 1 and result["text_source"] == "stdin"


def test_encoding_option(model_dir, tmp_path, capsys):
    """A latin-1 file fails as UTF-8 with a hint, and reads with --encoding latin-1."""
    path = tmp_path / "latin.txt"
    path.write_bytes("Caf\u00e9 cr\u00e8me".encode("latin-1"))
    code, out, err = run(capsys, "--model", str(model_dir), "--text", str(path))
    assert code == 2 and "--encoding" in err and "0xe9" in err and err.count("\n") == 1
    code, out, err = run(capsys, "--model", str(model_dir), "--text", str(path), "--encoding", "latin-1", "--json")
    assert code == 0, err
    assert json.loads(out)["bytes"] == len("Café crème".encode()) - 1  # UTF-8 bytes of the decoded text


def test_out_writes_the_report(model_dir, text_file, tmp_path, capsys):
    """--out DIR writes the per-token files, the reliability PNG and the HTML report."""
    pytest.importorskip("matplotlib")
    out_dir = tmp_path / "report"
    code, out, err = run(capsys, "--model", str(model_dir), "--text", str(text_file), "--out", str(out_dir), "-q")
    assert code == 0, err
    names = {p.name for p in out_dir.iterdir()}
    assert names == {"tokens.csv", "tokens.jsonl", "summary.json", "reliability.png", "report.html"}
    assert "wrote" in out and str(out_dir) in out
    rows = (out_dir / "tokens.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(rows) == len(ZEN.encode())


def test_streamed_report_equals_the_whole_text_report(model_dir, tmp_path, capsys, monkeypatch):
    """The report written while streaming in small pieces holds the rows and numbers of write_report over the
    whole text's scores; the page shows the first HTML_TOKENS tokens and says so."""
    from tokenloss.evaluation import reports, tokenizing
    from tokenloss.models import load_model

    text = ZEN * 3
    path = tmp_path / "long.txt"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(tokenizing, "PIECE_CHARS", 300)
    monkeypatch.setattr(reports, "HTML_TOKENS", 100)
    out_dir = tmp_path / "streamed"
    code, out, err = run(
        capsys, "--model", str(model_dir), "--text", str(path), "-o", str(out_dir), "-b", "4", "--json"
    )
    assert code == 0, err
    evaluation = evaluate(load_model(model_dir), text)
    expected = [json.loads(json.dumps(row)) for row in evaluation.scores.rows()]
    rows = [json.loads(line) for line in (out_dir / "tokens.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(expected) == len(text.encode())
    for row, want in zip(rows, expected):
        assert row.keys() == want.keys()
        for key, value in want.items():
            assert row[key] == (pytest.approx(value, rel=1e-5, abs=1e-6) if isinstance(value, float) else value), key
    page = (out_dir / "report.html").read_text(encoding="utf-8")
    assert f"The first 100 of the {len(rows)} tokens are shown" in page
    summary = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["tokens"] == evaluation.result["tokens"] == json.loads(out)["tokens"]


def test_an_interrupted_run_leaves_the_report_directory_as_it_was(model_dir, tmp_path, capsys, monkeypatch):
    """Bytes that do not decode, found after scoring started, stop the run: the earlier report is untouched and
    no temporary file is left behind."""
    from tokenloss.cli import eval as eval_cli

    monkeypatch.setattr(eval_cli, "READ_BLOCK", 256)
    path = tmp_path / "late-error.txt"
    path.write_bytes((ZEN * 4).encode() + b"\xff tail")
    out_dir = tmp_path / "report"
    out_dir.mkdir()
    (out_dir / "tokens.csv").write_text("an earlier run's rows\n")
    code, out, err = run(capsys, "--model", str(model_dir), "--text", str(path), "-o", str(out_dir), "-q")
    assert code == 2 and out == ""
    assert err == (
        f"Error: {path} is not valid utf-8 (byte 0xff at offset {len(ZEN.encode()) * 4}): pass its encoding with "
        "--encoding, e.g. --encoding latin-1 or --encoding cp1252\n"
    )
    assert [p.name for p in out_dir.iterdir()] == ["tokens.csv"]
    assert (out_dir / "tokens.csv").read_text() == "an earlier run's rows\n"


@pytest.mark.parametrize("scheme", ["lm-eval", "hf-guide"])
def test_windows_option_gives_the_schemes_numbers(tiny_hf_dir, tmp_path, capsys, scheme):
    directory = tiny_hf_dir("gpt2")
    path = tmp_path / "zen.txt"
    path.write_text(ZEN, encoding="utf-8")
    args = ["--model", str(directory), "--text", str(path), "-L", "16", "-S", "5", "--windows", scheme]
    code, out, err = run(capsys, *args, "--json")
    assert code == 0, err
    from tokenloss.models import load_model

    expected = evaluate(load_model(directory), ZEN, windows=scheme, max_length=16, stride=5).result
    got = json.loads(out)
    assert got["windows"] == scheme and got["num_windows"] == expected["num_windows"]
    for key in JSON_KEYS | {"word_perplexity", "byte_perplexity"}:
        assert got[key] == pytest.approx(expected[key], rel=1e-6), key
    code, out, err = run(capsys, *args, "-q")
    first_line = "disjoint (lm-evaluation-harness)" if scheme == "lm-eval" else "stride 5"
    assert code == 0 and f"windows  {scheme}: " in out and first_line in out


def test_options_reach_the_library(monkeypatch, text_file, capsys):
    """Each option is passed on: model path, device and dtype to load_model; windows and BOS to evaluate."""
    seen = {}

    def fake_load(path, *, device, dtype):
        seen["load"] = (path, device, dtype)
        return real_load(None) if path is None else real_load(path)

    def fake_evaluate(model, chunks, **kwargs):
        seen["evaluate"] = kwargs
        raise ValueError("stop here")

    real_load = tokenloss.models.load_model
    monkeypatch.setattr(tokenloss.models, "load_model", fake_load)
    monkeypatch.setattr(tokenloss.evaluation.scoring, "evaluate_stream", fake_evaluate)
    args = ["--text", str(text_file), "-L", "64", "-S", "16", "-b", "3", "--dtype", "bf16", "--no-bos", "-q"]
    args += ["--windows", "hf-guide"]
    code, _, err = run(capsys, *args)
    assert code == 2 and err == "Error: stop here\n"
    assert seen["load"] == (None, "cpu", "bf16")
    assert seen["evaluate"] == {
        "windows": "hf-guide",
        "max_length": 64,
        "stride": 16,
        "bos": False,
        "batch_size": 3,
        "progress": False,
        "size_hint": len(ZEN.encode()),
    }


def test_missing_transformers_is_one_line(monkeypatch, text_file, capsys):
    """A Hugging Face directory without transformers installed: the install hint, not a traceback."""

    def no_transformers(path, *, device, dtype):
        raise ImportError("a Hugging Face model needs transformers: pip install 'tokenloss[hf]'")

    monkeypatch.setattr(tokenloss.models, "load_model", no_transformers)
    code, out, err = run(capsys, "--model", "somewhere", "--text", str(text_file), "-q")
    assert code == 2 and out == ""
    assert err == "Error: a Hugging Face model needs transformers: pip install 'tokenloss[hf]'\n"


def test_default_model_is_the_builtin_byte_gpt(text_file, capsys):
    """Without --model, the byte GPT shipped in the package is evaluated."""
    code, out, err = run(capsys, "--text", str(text_file), "--json", "-S", "96")
    assert code == 0, err
    result = json.loads(out)
    assert result["model"] == "builtin byte GPT" and result["vocab_size"] == 256
    assert result["max_length"] == load_model().max_length
    assert result["loss_nats"] < result["log_vocab"]  # a trained model beats the uniform guess


def bad_inputs(tmp, model_dir, text_file):
    empty = tmp / "empty.txt"
    empty.write_text("")
    binary = tmp / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    blocker = tmp / "blocker"
    blocker.write_text("x")
    model, text = ["--model", str(model_dir)], ["--text", str(text_file)]
    return {
        "missing model dir": (["--model", str(tmp / "nope"), *text], "does not exist"),
        "model dir without config": (["--model", str(tmp), *text], "no config.json"),
        "missing text": ([*model, "--text", str(tmp / "nope.txt")], "does not exist"),
        "empty text": ([*model, "--text", str(empty)], "empty"),
        "stride larger than window": ([*model, *text, "-L", "16", "-S", "20"], "smaller than --max-length"),
        "stride equal to window": ([*model, *text, "-L", "16", "-S", "16"], "smaller than --max-length"),
        "stride beyond the context": ([*model, *text, "-S", "40"], "must be smaller than max_length (32)"),
        "window beyond the context": ([*model, *text, "-L", "33"], "exceeds the model's context of 32"),
        "undecodable text": ([*model, "--text", str(binary)], "--encoding"),
        "unknown encoding": ([*model, *text, "--encoding", "klingon"], "unknown encoding"),
        "bos without one": ([*model, *text, "--bos"], "defines no BOS"),
        "bad dtype": ([*model, *text, "--dtype", "int8"], "dtype must be"),
        "no cuda": ([*model, *text, "--device", "cuda"], "CUDA is not available")
        if not torch.cuda.is_available()
        else ([*model, *text, "--device", "tpu"], "unknown device"),
        "out is a file": ([*model, *text, "--out", str(blocker)], "not a directory"),
        "zero batch": ([*model, *text, "-b", "0"], "--batch-size"),
        "unknown windows": ([*model, *text, "--windows", "rolling"], "--windows must be one of sliding, lm-eval"),
        "lm-eval without a prefix token": ([*model, *text, "--windows", "lm-eval"], "defines neither BOS nor EOS"),
        "lm-eval with --no-bos": ([*model, *text, "--windows", "lm-eval", "--no-bos"], "--no-bos does not apply"),
    }


# The keys of bad_inputs(): the cases need tmp_path and the fixtures, so they are built per test.
BAD_NAMES = [
    "missing model dir",
    "model dir without config",
    "missing text",
    "empty text",
    "stride larger than window",
    "stride equal to window",
    "stride beyond the context",
    "window beyond the context",
    "undecodable text",
    "unknown encoding",
    "bos without one",
    "bad dtype",
    "no cuda",
    "out is a file",
    "zero batch",
    "unknown windows",
    "lm-eval without a prefix token",
    "lm-eval with --no-bos",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_input_is_one_clear_line(name, model_dir, text_file, tmp_path, capsys):
    """Each mistake: exit status 2, nothing on stdout, one "Error: ..." line that says what is wrong."""
    args, message = bad_inputs(tmp_path, model_dir, text_file)[name]
    code, out, err = run(capsys, *args, "-q")
    assert code == 2, err
    assert out == ""
    assert err.startswith("Error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err


def test_real_process_prints_no_traceback(model_dir):
    """Through the real entry point (python -m tokenloss), bad stdin bytes give one line and status 2."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TOKENLOSS_DEBUG", None)
    done = subprocess.run(
        [sys.executable, "-m", "tokenloss", "eval", "--model", str(model_dir)],
        input=b"\xc3\x28 not utf-8",
        capture_output=True,
        env=env,
        timeout=120,
    )
    err = done.stderr.decode()
    assert done.returncode == 2 and done.stdout == b""
    assert err.startswith("Error: stdin is not valid utf-8") and err.count("\n") == 1


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_two_processes_equal_one(model_dir, text_file, tmp_path, capsys):
    """torchrun with 2 CPU processes (gloo): windows sharded across ranks, the same JSON numbers as one process."""
    args = ["--model", str(model_dir), "--text", str(text_file), "-S", "8", "--json"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        + ["-m", "tokenloss", "eval", *args],
        capture_output=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert two.returncode == 0, two.stderr.decode()[-2000:]
    lines = [line for line in two.stdout.decode().splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 prints, rank 1 is quiet
    single, sharded = json.loads(out), json.loads(lines[0])
    assert sharded["world_size"] == 2 and single["world_size"] == 1
    for key in ("tokens", "bytes", "words", "num_windows", "first_token"):
        assert sharded[key] == single[key], key
    for key in JSON_KEYS - {"tokens"}:
        assert sharded[key] == pytest.approx(single[key], rel=1e-6), key


@pytest.mark.parametrize("damage", ["truncated", "empty", "bad-config"])
def test_a_broken_model_directory_is_one_line(tmp_path, capsys, damage):
    """Corrupt, empty or truncated safetensors, or an unreadable config: one line naming the file, exit 2."""
    from tokenloss.models.bytegpt import ByteGPT, GPTConfig

    directory = tmp_path / "m"
    ByteGPT(GPTConfig(block_size=8, n_layer=1, n_head=1, n_embd=8)).save_pretrained(directory)
    weights = directory / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "empty":
        weights.write_bytes(b"")
    else:
        (directory / "config.json").write_text('{"model_type": "tokenloss-bytegpt", "n_layer": ')
    text = tmp_path / "t.txt"
    text.write_text("hello world")
    assert main(["eval", "--model", str(directory), "--text", str(text), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "config.json" in err if damage == "bad-config" else "model.safetensors" in err


def test_a_directory_as_text_is_one_line(tmp_path, capsys):
    assert main(["eval", "--text", str(tmp_path), "--quiet"]) == 2
    assert "is not a file" in capsys.readouterr().err


def test_stdin_on_a_terminal_says_it_is_reading(monkeypatch, capsys):
    """With no --text on a terminal, one line says that standard input is read (and how to end it)."""
    from tokenloss.cli.eval import read_text

    class Terminal(io.TextIOWrapper):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal(io.BytesIO(b"typed text")))
    assert read_text(None, "utf-8") == ("typed text", "stdin")
    assert "reading the text from standard input" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"piped")))
    assert read_text(None, "utf-8") == ("piped", "stdin")
    assert capsys.readouterr().err == ""


def test_word_count_says_which_count_when_they_differ(tmp_path, capsys):
    """lm-eval's word count (kept for comparability) is named, with the whitespace count, when they differ."""
    text = tmp_path / "t.txt"
    text.write_text("hello there, how are you today\n")
    assert main(["eval", "--text", str(text), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "7 words by lm-eval's count" in out and "6 separated by whitespace" in out
    text.write_text("hello there, how are you today")
    assert main(["eval", "--text", str(text), "--quiet"]) == 0
    assert "(6 words, lm-eval count)" in capsys.readouterr().out  # the same count: nothing more said
