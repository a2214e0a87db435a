"""Tests of tokenloss.evaluation.windows: each scheme against an independent copy of the code it claims to be,
the streamed plan against the whole one, and the scores against float64 and lm-evaluation-harness itself."""

from __future__ import annotations

import math
import re

import pytest
import torch

from tokenloss.evaluation.scoring import evaluate, evaluate_stream, score_text
from tokenloss.evaluation.windows import SCHEMES, WindowPlanner, plan_windows
from tokenloss.models import load_model

ZEN = __import__("codecs").decode(__import__("this").s, "rot13")
PREFIX = -1  # stands for the prefix token in the references below

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Independent references: the published loops, written out here (inputs with PREFIX, scored tokens).


def lm_eval_reference(n: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """lm-evaluation-harness 0.4.x: get_rolling_token_windows(context_len=1) + make_disjoint_window, and the
    input _loglikelihood_tokens builds: (context + continuation)[-(max_length + 1):][:-1]."""
    tokens = list(range(n))
    pairs = []
    if n:
        pred_len, predicted = max_length, 0
        first = min(max_length, n)
        pairs.append(([PREFIX] + tokens[: first - 1], tokens[:first]))
        predicted += first
        while predicted < n:
            count = min(n - predicted, pred_len)
            end = predicted + count
            pairs.append((tokens[end - max_length - 1 : end - 1], tokens[end - count : end]))
            predicted += count
    windows = []
    for context, continuation in pairs:
        context = context[: len(context) - (len(continuation) - 1)]
        windows.append(((context + continuation)[-(max_length + 1) :][:-1], continuation))
    return windows


def hf_guide_reference(n: int, max_length: int, stride: int, bos: bool) -> list[tuple[list[int], list[int]]]:
    """The Hugging Face guide "Perplexity of fixed-length models" loop, over BOS + tokens when bos."""
    sequence = ([PREFIX] if bos else []) + list(range(n))
    windows, previous_end = [], 0
    for begin in range(0, len(sequence), stride):
        end = min(begin + max_length, len(sequence))
        target_length = end - previous_end
        inputs = sequence[begin:end]
        # labels: the last target_length inputs; the model's shift drops the first label of the window
        scored = [sequence[j] for j in range(max(begin + 1, end - target_length), end)]
        if scored:
            windows.append((inputs, scored))
        previous_end = end
        if end == len(sequence):
            break
    return windows


def sliding_reference(n: int, max_length: int, stride: int, bos: bool) -> list[tuple[list[int], list[int]]]:
    """BOS before every window, C = L - bos text tokens per window, the last one flush with the end."""
    capacity = max_length - int(bos)
    first = 0 if bos else 1
    if n <= first:
        return []
    prefix = [PREFIX] if bos else []
    end = min(capacity, n)
    windows = [(prefix + list(range(end)), list(range(first, end)))]
    while end < n:
        new_end = min(end + stride, n)
        windows.append((prefix + list(range(new_end - capacity, new_end)), list(range(end, new_end))))
        end = new_end
    return windows


def planned(n, max_length, stride, bos, scheme):
    return [
        (([PREFIX] if w.prefix else []) + list(range(w.begin, w.end)), list(range(w.score_from, w.score_to)))
        for w in plan_windows(n, max_length=max_length, stride=stride, bos=bos, scheme=scheme)
    ]


CASES = [(n, length, stride) for n in range(0, 26) for length in (2, 3, 5, 8) for stride in range(1, length)]


@pytest.mark.parametrize("bos", [False, True])
def test_hf_guide_is_the_guide_loop(bos):
    for n, length, stride in CASES:
        assert planned(n, length, stride, bos, "hf-guide") == hf_guide_reference(n, length, stride, bos)


@pytest.mark.parametrize("bos", [False, True])
def test_sliding_is_flush_with_the_end(bos):
    for n, length, stride in CASES:
        assert planned(n, length, stride, bos, "sliding") == sliding_reference(n, length, stride, bos)


def test_lm_eval_is_the_harness_loop():
    for n, length, _ in CASES:
        assert planned(n, length, 1, True, "lm-eval") == lm_eval_reference(n, length)


def test_lm_eval_is_the_installed_harness():
    """When lm-evaluation-harness is installed: its own window functions give the same windows."""
    utils = pytest.importorskip("lm_eval.utils")
    for n, length, _ in CASES:
        pairs = utils.get_rolling_token_windows(list(range(n)), PREFIX, length, 1)
        theirs = [((a + b)[-(length + 1) :][:-1], b) for a, b in map(utils.make_disjoint_window, pairs)]
        assert planned(n, length, 1, True, "lm-eval") == theirs


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bos", [False, True])
def test_every_window_fits_and_every_token_is_scored_once(scheme, bos):
    if scheme == "lm-eval" and not bos:
        pytest.skip("lm-eval always has its prefix token")
    for n, length, stride in CASES:
        windows = plan_windows(n, max_length=length, stride=stride, bos=bos, scheme=scheme)
        scored = [i for w in windows for i in range(w.score_from, w.score_to)]
        first = 0 if bos else 1
        assert scored == list(range(first, n)) if n > first else scored == []
        for w in windows:
            assert w.length <= length and w.begin <= w.score_from and w.score_to <= w.end + 1
            assert w.score_from > w.begin or w.prefix  # every scored token has context


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("step", [1, 3, 7])
def test_a_plan_made_as_tokens_arrive_is_the_whole_plan(scheme, step):
    for n, length, stride in CASES:
        for bos in (True,) if scheme == "lm-eval" else (False, True):
            planner = WindowPlanner(scheme, max_length=length, stride=stride, bos=bos)
            streamed, kept = [], []  # kept: (windows planned so far, keep_from then)
            for available in range(0, n, step):
                streamed += planner.ready(available, final=False)
                kept.append((len(streamed), planner.keep_from()))
            streamed += planner.ready(n, final=True)
            for planned_before, keep_from in kept:  # no later window reads a token the buffer dropped
                assert all(w.begin >= keep_from for w in streamed[planned_before:])
            assert streamed == plan_windows(n, max_length=length, stride=stride, bos=bos, scheme=scheme)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"scheme": "rolling"}, ValueError, "windows must be one of sliding, lm-eval, hf-guide"),
        ({"scheme": "lm-eval", "bos": False}, ValueError, "always open with a prefix token"),
        ({"max_length": 1}, ValueError, "max_length must be at least 2"),
        ({"stride": 8}, ValueError, "stride .8. must be smaller than max_length .8."),
        ({"stride": 2.0}, TypeError, "stride must be an int"),
    ],
)
def test_bad_settings_are_named(kwargs, error, match):
    settings = {"max_length": 8, "stride": 4, "bos": True, "scheme": "sliding", **kwargs}
    with pytest.raises(error, match=match):
        plan_windows(10, **settings)


# ---------------------------------------------------------------------------------------------
# The scores of each scheme against a float64 recomputation and against lm-evaluation-harness.

MODELS = [("gpt2", False), ("llama", True)]  # GPT-2 without BOS; Llama whose tokenizer adds <s> itself


def float64_log_likelihood(directory, text, scheme, max_length, stride, bos) -> tuple[float, int]:
    """Sum of log p over the scored tokens, each window run by transformers in float64 from the references."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).double().eval()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if scheme == "lm-eval":
        windows = lm_eval_reference(len(ids), max_length)
    elif scheme == "hf-guide":
        windows = hf_guide_reference(len(ids), max_length, stride, bos)
    else:
        windows = sliding_reference(len(ids), max_length, stride, bos)
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, scored in windows:
            tokens = [prefix if i == PREFIX else ids[i] for i in inputs]
            log_p = torch.log_softmax(model(input_ids=torch.tensor([tokens])).logits[0], -1)  # (T, V) float64
            for i in scored:
                # predicted at the input of token i - 1, or at the prefix (the first input) when that is not there
                position = inputs.index(i - 1) if i > 0 and i - 1 in inputs else 0
                total += float(log_p[position, ids[i]])
                count += 1
    return total, count


@pytest.mark.parametrize(("arch", "adds_bos"), MODELS)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bos", [False, True])
def test_each_scheme_equals_a_float64_recomputation(tiny_hf_dir, arch, adds_bos, scheme, bos):
    if scheme == "lm-eval" and not bos:
        pytest.skip("lm-eval always has its prefix token")
    directory = tiny_hf_dir(arch, adds_bos=adds_bos, trained=True)
    expected, count = float64_log_likelihood(directory, ZEN, scheme, 24, 7, bos)
    result = evaluate(load_model(directory), ZEN, windows=scheme, max_length=24, stride=7, bos=bos).result
    assert result["tokens"] == count
    assert -result["loss_nats"] * result["tokens"] == pytest.approx(expected, rel=2e-6)
    assert result["loss_nats"] < math.log(result["vocab_size"]) - 0.5  # trained: far from a uniform guess


@pytest.mark.parametrize(("arch", "adds_bos"), MODELS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_streamed_scores_equal_the_whole_text(tiny_hf_dir, arch, adds_bos, scheme):
    """evaluate_stream with small pieces: the same numbers and rows as scoring the text at once."""
    directory = tiny_hf_dir(arch, adds_bos=adds_bos, trained=True)
    lm = load_model(directory)
    text = ZEN * 3
    whole = evaluate(lm, text, windows=scheme, max_length=24, stride=7)
    rows = []
    chunks = [text[i : i + 97] for i in range(0, len(text), 97)]
    streamed = evaluate_stream(
        lm,
        chunks,
        windows=scheme,
        max_length=24,
        stride=7,
        batch_size=3,
        piece_chars=300,
        sink=lambda r, _: rows.extend(r),
    )
    assert not streamed.result["tokenized_whole"]  # cut in pieces, with the tokens of the whole text
    for key in ("tokens", "bytes", "words", "words_whitespace", "num_windows", "text_tokens", "first_token"):
        assert streamed.result[key] == whole.result[key], key
    for key in ("loss_nats", "bits_per_byte", "word_perplexity", "accuracy", "entropy_nats", "ece"):
        assert streamed.result[key] == pytest.approx(whole.result[key], rel=1e-6), key
    assert rows == list(whole.scores.rows())


@pytest.mark.parametrize(("arch", "adds_bos"), MODELS)
@pytest.mark.parametrize("max_length", [16, 64])
def test_lm_eval_windows_reproduce_lm_evaluation_harness(tiny_hf_dir, arch, adds_bos, max_length):
    """When lm-evaluation-harness is installed: its HFLM.loglikelihood_rolling on the same model, text and
    max_length, and its wikitext metrics, give our word_perplexity, byte_perplexity and bits_per_byte to 1e-6."""
    pytest.importorskip("accelerate")
    huggingface = pytest.importorskip("lm_eval.models.huggingface")
    from lm_eval.api.instance import Instance
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity

    directory = tiny_hf_dir(arch, adds_bos=adds_bos, trained=True)
    harness = huggingface.HFLM(
        pretrained=str(directory), max_length=max_length, batch_size=1, device="cpu", dtype="float32",
        add_bos_token=False,
    )  # fmt: skip
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(ZEN,), idx=0)
    (log_likelihood,) = harness.loglikelihood_rolling([request], disable_tqdm=True)
    words, num_bytes = len(re.split(r"\s+", ZEN)), len(ZEN.encode("utf-8"))  # wikitext's process_results
    theirs = {
        "word_perplexity": weighted_perplexity([(log_likelihood, words)]),
        "byte_perplexity": weighted_perplexity([(log_likelihood, num_bytes)]),
        "bits_per_byte": bits_per_byte([(log_likelihood, num_bytes)]),
    }
    ours = evaluate(load_model(directory), ZEN, windows="lm-eval", max_length=max_length).result
    assert (ours["words"], ours["bytes"]) == (words, num_bytes)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, rel=1e-6), key


def test_first_token_bytes_come_from_the_token_not_its_character(tiny_hf_dir):
    """A text opening with a CJK character under a byte-level BPE: the first token holds part of the character,
    and without BOS the unscored bytes are that token's bytes, not the character's."""
    directory = tiny_hf_dir("gpt2")
    lm = load_model(directory)
    text = "漢字 is not in the vocabulary, so its bytes are tokens of their own."
    ids, _ = lm.encode_with_offsets(text)
    first = lm.token_bytes(ids[0])
    assert first is not None and len(first) < len("漢".encode())  # the vocabulary has no merge for it
    scores = score_text(lm, text, bos=False)
    assert scores.scored_bytes == len(text.encode()) - len(first)
    result = evaluate(lm, text, bos=False).result
    assert result["bytes"] == len(text.encode()) - len(first)
    assert sum(len(lm.token_bytes(i)) for i in ids) == len(text.encode())  # the token bytes add up to the text
