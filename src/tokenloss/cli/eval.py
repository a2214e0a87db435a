"""``tokenloss eval``: the loss of a causal LM on a text, as perplexity, bits per token/byte, accuracy and ECE.

A thin layer over :func:`tokenloss.models.load_model`, :func:`tokenloss.evaluation.scoring.evaluate_stream` and
:class:`tokenloss.evaluation.reports.ReportWriter`: it reads the text (a file or stdin) block by block and
scores it as it arrives, in memory bounded by a piece of the text and a batch of windows, writing the
per-token files as it goes. Under ``torchrun`` it starts a process group (gloo on CPU, NCCL on CUDA),
rank 0 reads the whole text and shares it, and the windows are dealt out to the ranks
(:func:`tokenloss.evaluation.scoring.evaluate`). It prints a table or one JSON object.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from tokenloss.cli.errors import CLIError

EXAMPLES = """
Examples:

  tokenloss eval --text notes.txt              # the built-in byte GPT

  cat notes.txt | tokenloss eval --json        # stdin, one JSON object

  tokenloss eval --model ./gpt2 --text wiki.txt -L 1024 -S 512 --out rep/

  tokenloss eval --model ./gpt2 --text wiki.txt --windows lm-eval -L 1024   # lm-eval's numbers

  tokenloss eval --model ./llama --text wiki.txt --dtype bfloat16 --device cuda

  torchrun --nproc-per-node 2 -m tokenloss eval --model ./gpt2 --text wiki.txt
"""


def read_text(source: str | None, encoding: str) -> tuple[str, str]:
    """The whole text of a file, or of stdin when ``source`` is None or ``"-"``: ``(text, label)``.

    Raises:
        CLIError: as :func:`open_text`, and for bytes that do not decode.
    """
    label, _, chunks = open_text(source, encoding)
    text = "".join(chunks)
    if not text:
        raise CLIError(f"{label} is empty: give a text to evaluate")
    return text, label


READ_BLOCK = 1 << 20  # bytes read at a time


def open_text(source: str | None, encoding: str) -> tuple[str, int | None, Iterator[str]]:
    """Opens the text for reading in blocks: ``(label, size in bytes or None, decoded chunks)``.

    The chunks raise :class:`~tokenloss.cli.errors.CLIError` for bytes that do not decode.

    Raises:
        CLIError: an unknown encoding, a missing, unreadable or empty file, a directory.
    """
    import codecs

    from tokenloss.evaluation.tokenizing import UndecodableText, decode_chunks

    try:
        codecs.lookup(encoding)
    except LookupError:
        raise CLIError(f"unknown encoding {encoding!r}: pass a Python codec name to --encoding, e.g. utf-8") from None
    if source is None or source == "-":
        if sys.stdin.isatty():  # a person at a terminal, not a pipe: say why nothing happens
            print(
                "tokenloss eval: reading the text from standard input; type or paste it, then Ctrl-D "
                "(or pass --text FILE)",
                file=sys.stderr,
            )
        handle, label, size = sys.stdin.buffer, "stdin", None
    else:
        path = Path(source)
        if not path.exists():
            raise CLIError(f"text file {source!r} does not exist")
        if not path.is_file():
            raise CLIError(f"{source!r} is not a file: pass a text file to --text (or - for stdin)")
        try:
            handle, label, size = path.open("rb"), source, path.stat().st_size
        except OSError as error:
            raise CLIError(f"cannot read {source!r}: {error.strerror}") from None
        if size == 0:
            handle.close()
            raise CLIError(f"{label} is empty: give a text to evaluate")

    def blocks() -> Iterator[bytes]:
        try:
            while block := handle.read(READ_BLOCK):
                yield block
        except OSError as error:
            raise CLIError(f"cannot read {label!r}: {error.strerror}") from None
        finally:
            if handle is not sys.stdin.buffer:
                handle.close()

    def chunks() -> Iterator[str]:
        try:
            yield from decode_chunks(blocks(), encoding)
        except UndecodableText as error:
            raise CLIError(
                f"{label} is not valid {encoding} (byte 0x{error.byte:02x} at offset {error.offset}): "
                f"pass its encoding with --encoding, e.g. --encoding latin-1 or --encoding cp1252"
            ) from None

    return label, size, chunks()


def _setup_distributed(device: str) -> tuple[bool, int, int, str]:
    """Starts a process group from torchrun's environment if WORLD_SIZE > 1; returns (created, rank, world, device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return False, 0, 1, device
    import torch
    import torch.distributed as dist

    on_cuda = device.startswith("cuda")
    if on_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local_rank}"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if on_cuda else "gloo")
        created = True
    return created, dist.get_rank(), dist.get_world_size(), device


def _share_text(source: str | None, encoding: str, rank: int, world_size: int) -> tuple[str, str]:
    """Rank 0 reads the text and sends it (or its error) to the others."""
    if world_size == 1:
        return read_text(source, encoding)
    import torch.distributed as dist

    payload: list = [None]
    if rank == 0:
        try:
            payload = [("ok", *read_text(source, encoding))]
        except CLIError as error:
            payload = [("error", str(error), "")]
    dist.broadcast_object_list(payload, src=0)
    status, first, second = payload[0]
    if status == "error":
        raise CLIError(first)
    return first, second


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _word_note(result: dict) -> str:
    """Which word count the word perplexity divides by, and the plain count when they differ."""
    words, plain = result["words"], result.get("words_whitespace")
    if plain is None or plain == words:
        return f"per word ({words} words, lm-eval count)"
    return (
        f"per word ({words} words by lm-eval's count, re.split(r'\\s+'), which counts leading or trailing "
        f"whitespace as a word; {plain} separated by whitespace)"
    )


def format_summary(result: dict) -> str:
    """The human-readable summary: settings, the first token, and the metrics table."""
    from tokenloss.evaluation.formatting import format_number
    from tokenloss.models import display_token

    first = result.get("first_token") or {}
    lines = [
        f"model    {result['model_description']}",
        f"text     {result['text_source']}: {result['characters']} characters, {result['text_bytes']} bytes, "
        f"{result['text_words']} words -> {result['text_tokens']} tokens",
        f"windows  {result['windows']}: {result['num_windows']} of up to {result['max_length']} tokens"
        + (f", stride {result['stride']}" if result["windows"] != "lm-eval" else ", disjoint (lm-evaluation-harness)")
        + (f", over {result['world_size']} processes" if result["world_size"] > 1 else ""),
    ]
    if result.get("tokenized_whole"):
        lines.append("note     this tokenizer cannot be cut exactly: the text was tokenized whole, in memory")
    token = display_token(first.get("text", ""))
    if result["windows"] == "lm-eval":
        lines.append(
            f"prefix   id {result['prefix_token_id']} before the first window, as lm-eval: every token is scored"
        )
        if first.get("surprisal_bits") is not None:
            lines.append(f"first    {token!r} scored after the prefix token: {first['surprisal_bits']:.2f} bits")
    elif result["bos"]:
        where = "every window" if result["windows"] == "sliding" else "the text"
        lines.append(f"BOS      yes (id {result['bos_token_id']}) before {where}: every token is scored")
        if first.get("surprisal_bits") is not None:
            lines.append(f"first    {token!r} scored after BOS: {first['surprisal_bits']:.2f} bits")
    else:
        lines.append("BOS      no (" + result["bos_reason"] + ")")
        lines.append(f"first    {token!r} not scored (no context); the numbers below count the other tokens")
    top_k = [key for key in result if key.startswith("top") and key.endswith("_accuracy") and key != "top1_accuracy"]
    extra_acc = ", ".join(f"{key[3:-9]}: {format_number(result[key])}" for key in top_k)
    rows = [
        ("tokens", result["tokens"], "scored tokens"),
        ("loss", result["loss_nats"], "nats per token"),
        ("perplexity", result["perplexity"], "per token: exp(loss) = 2 ** bits per token"),
        ("bits per token", result["bits_per_token"], "loss / ln 2"),
        ("bits per byte", result["bits_per_byte"], f"per UTF-8 byte ({result['bytes']} bytes)"),
        ("byte perplexity", result["byte_perplexity"], "per byte: 2 ** bits per byte"),
        ("word perplexity", result["word_perplexity"], _word_note(result)),
        ("accuracy", result["accuracy"], "top-1" + (f"; top-{extra_acc}" if extra_acc else "")),
        ("mean entropy", result["entropy_nats"], "nats per token, of the predictions"),
        ("ECE", result["ece"], f"{result['n_bins']} equal-width bins of the top-1 probability"),
        ("log V", result["log_vocab"], f"nats: the loss of an untrained (uniform) model, V = {result['vocab_size']}"),
    ]
    name_width = max(len(name) for name, _, _ in rows)
    value_width = max(len(format_number(value)) for _, value, _ in rows)
    lines.append("")
    for name, value, note in rows:
        lines.append(f"  {name:<{name_width}}  {format_number(value):>{value_width}}  {note}")
    return "\n".join(lines)


def run_eval(
    *,
    text: str | None,
    model: str | None,
    windows: str = "sliding",
    max_length: int | None,
    stride: int | None,
    batch_size: int,
    device: str,
    dtype: str,
    bos: bool | None,
    encoding: str,
    out: Path | None,
    as_json: bool,
    quiet: bool,
) -> int:
    """Does what ``tokenloss eval`` asks; prints on rank 0 only. Returns the exit status."""
    from tokenloss.models import load_model

    if out is not None and out.exists() and not out.is_dir():
        raise CLIError(f"--out {str(out)!r} exists and is not a directory")
    created, rank, world_size, device = _setup_distributed(device)
    try:
        if world_size == 1:
            source, size, chunks = open_text(text, encoding)
        else:
            source_text, source = _share_text(text, encoding, rank, world_size)
        try:
            lm = load_model(model, device=device, dtype=dtype)
        except ImportError as error:  # transformers missing for a Hugging Face directory
            raise CLIError(str(error)) from None
        options = dict(
            windows=windows,
            max_length=max_length,
            stride=stride,
            bos=bos,
            batch_size=batch_size,
            progress=not quiet and not as_json,
        )
        if world_size == 1:
            evaluation, written = _evaluate_streaming(lm, chunks, size, out, options)
        else:
            from tokenloss.evaluation.scoring import evaluate

            evaluation = evaluate(lm, source_text, gather=out is not None, details=out is not None, **options)
        if rank != 0:
            return 0
        result = dict(evaluation.result)
        result.update(
            {
                "model_description": lm.describe(),
                "dtype": str(lm.dtype).removeprefix("torch."),
                "device": str(lm.device),
                "text_source": source,
                "bos_token_id": result["prefix_token_id"] if result["bos"] else None,
                "bos_reason": _bos_reason(lm.bos_token_id, bos, result["bos"]),
            }
        )
        result = _clean(result)
        if out is not None:
            written = _write_out(out, result, evaluation, written if world_size == 1 else None, lm.vocab_size)
            result["out"] = {kind: str(path) for kind, path in written.items()}
        if as_json:
            print(json.dumps(result, ensure_ascii=False, allow_nan=False))
        else:
            print(format_summary(result))
            if out is not None:
                print(f"\nwrote {', '.join(path.name for path in written.values())} to {out}")
        return 0
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _evaluate_streaming(lm, chunks: Iterator[str], size: int | None, out: Path | None, options: dict):
    """Scores the text as it is read; with ``out``, returns the open :class:`ReportWriter` (not yet finished)."""
    from tokenloss.evaluation.reports import ReportWriter
    from tokenloss.evaluation.scoring import evaluate_stream

    if out is None:
        return evaluate_stream(lm, chunks, size_hint=size, **options), None
    writer = ReportWriter(out)
    try:
        writer.__enter__()
    except OSError as error:
        raise CLIError(f"cannot write the report to {str(out)!r}: {error.strerror or error}") from None
    try:
        return evaluate_stream(lm, chunks, size_hint=size, sink=writer, **options), writer
    except BaseException as error:
        writer.__exit__(type(error), error, error.__traceback__)
        raise


def _write_out(out: Path, result: dict, evaluation, writer, vocab_size: int) -> dict:
    from tokenloss.evaluation.reports import write_report

    try:
        if writer is not None:
            try:
                return writer.finish(result, vocab_size=vocab_size)
            finally:
                writer.__exit__(None, None, None)
        return write_report(evaluation.scores, result, out)
    except OSError as error:
        raise CLIError(f"cannot write the report to {str(out)!r}: {error.strerror or error}") from None


def _bos_reason(bos_token_id: int | None, asked: bool | None, used: bool) -> str:
    if used:
        return "asked for" if asked else "the tokenizer defines one"
    if bos_token_id is None:
        return "the tokenizer defines no BOS token"
    return "--no-bos"


def register(app: typer.Typer) -> None:
    """Adds the ``eval`` command to ``app``."""

    @app.command(
        "eval",
        help="Evaluate a causal LM on a text: perplexity per token, byte and word, bits, accuracy, ECE.\n\n"
        "Scores each token once in sliding windows (up to MAX_LENGTH - 1 tokens of context, STRIDE new "
        "tokens per window). With no --model, uses the built-in byte-level GPT.",
        epilog=EXAMPLES,
    )
    def eval_command(
        text: Annotated[
            str | None, typer.Option("--text", "-t", help="Text file to evaluate; - or none reads stdin.")
        ] = None,
        model: Annotated[
            str | None,
            typer.Option("--model", "-m", help="Hugging Face or ByteGPT model directory (default: built-in byte GPT)."),
        ] = None,
        windows: Annotated[
            str,
            typer.Option(
                "--windows",
                "-w",
                help="Window scheme: sliding (stride S, BOS before every window), lm-eval (exactly "
                "lm-evaluation-harness's rolling windows: its word/byte perplexity and bits per byte), "
                "hf-guide (the Hugging Face perplexity guide's windows).",
            ),
        ] = "sliding",
        max_length: Annotated[
            int | None,
            typer.Option("--max-length", "-L", help="Inputs per window, BOS included (default: model context)."),
        ] = None,
        stride: Annotated[
            int | None,
            typer.Option(
                "--stride",
                "-S",
                help="New tokens scored per window, at most MAX_LENGTH - 1 (default: MAX_LENGTH // 2).",
            ),
        ] = None,
        batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Windows per forward pass.")] = 1,
        device: Annotated[str, typer.Option("--device", help="cpu or cuda (cuda:N).")] = "cpu",
        dtype: Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16.")] = "float32",
        bos: Annotated[
            bool | None,
            typer.Option("--bos/--no-bos", help="Put BOS before every window (default: if the tokenizer has one)."),
        ] = None,
        encoding: Annotated[str, typer.Option("--encoding", help="Encoding of the text.")] = "utf-8",
        out: Annotated[
            Path | None,
            typer.Option("--out", "-o", help="Directory for tokens.csv/.jsonl, reliability.png, report.html."),
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    ) -> None:
        if batch_size < 1:
            raise CLIError(f"--batch-size must be at least 1, got {batch_size}")
        from tokenloss.evaluation.windows import SCHEMES

        if windows not in SCHEMES:
            raise CLIError(f"--windows must be one of {', '.join(SCHEMES)}; got {windows!r}")
        if max_length is not None and stride is not None and stride >= max_length:
            raise CLIError(
                f"--stride ({stride}) must be smaller than --max-length ({max_length}): "
                f"use a stride of at most {max_length - 1}"
            )
        code = run_eval(
            text=text,
            model=model,
            windows=windows,
            max_length=max_length,
            stride=stride,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            bos=bos,
            encoding=encoding,
            out=out,
            as_json=as_json,
            quiet=quiet,
        )
        if code:
            raise typer.Exit(code)
