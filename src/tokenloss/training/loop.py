"""Training a :class:`~tokenloss.models.bytegpt.ByteGPT` on bytes: data, schedule, validation, early stopping, logs.

One loop, written to be read. The text's UTF-8 bytes are split once into a training part (the
first ``1 - val_fraction``) and a held-out validation part (the rest, never trained on). Each step
draws ``batch_size`` random windows of ``block_size + 1`` bytes from the training part (a seeded
generator: the same seed gives the same batches), computes the mean next-byte loss with
``tl.linear_cross_entropy(hidden, model.lm_head.weight, targets)`` (the ``(B, T, 256)`` logits are
never held), and takes one AdamW step with a linear-warmup + cosine learning rate and gradient
clipping.

Step ``i`` means: the loss of batch ``i`` under the weights after ``i`` updates. Step 0 therefore
shows the untrained model; with ``lm_head`` at zero its loss is exactly ``log 256 = 5.545``.
Every ``eval_interval`` steps (and at step 0 and the last step) the validation loss is measured on
a fixed set of windows; when it has not improved by ``min_delta`` for ``patience`` evaluations in a
row training stops early, and the best weights (lowest validation loss) are the ones kept.

Each logged step is one JSON object in ``log.jsonl`` (written as training goes, so ``tokenloss
curve`` can read a run in progress): ``step``, ``loss`` (mean training loss over the steps since
the previous record), ``ppl``, ``lr``, ``tokens_per_s``, ``elapsed_s`` and, when evaluated,
``val_loss`` and ``val_ppl``. Losses are in nats per byte.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

import tokenloss as tl
from tokenloss.models.bytegpt import ByteGPT, GPTConfig


@dataclass(frozen=True)
class TrainConfig:
    """The knobs of :func:`train`; the defaults train the shipped model in a few CPU minutes.

    Attributes:
        steps: the most optimizer steps (fewer when early stopping ends the run).
        batch_size: windows per step.
        lr: peak learning rate of AdamW.
        min_lr: learning rate at the end of the cosine decay.
        warmup_steps: steps of linear warmup from 0 to ``lr``.
        weight_decay: AdamW's decoupled weight decay (matrices only; biases, norms and
            embeddings are not decayed).
        betas: AdamW's ``(beta1, beta2)``.
        grad_clip: clip the global gradient norm to this (0 disables it).
        val_fraction: the share of the text, taken from its end, held out for validation.
        eval_interval: evaluate the validation loss every this many steps.
        eval_windows: validation windows per evaluation (fixed, evenly spaced over the split).
        log_interval: write a log record every this many steps.
        patience: stop after this many evaluations in a row without improvement (0 disables).
        min_delta: an improvement must lower the best validation loss by more than this.
        seed: seeds the weights and the batches.
    """

    steps: int = 600
    batch_size: int = 16
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    val_fraction: float = 0.1
    eval_interval: int = 50
    eval_windows: int = 64
    log_interval: int = 10
    patience: int = 3
    min_delta: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_interval", "eval_windows", "log_interval"):
            _check_int(name, getattr(self, name), low=1)
        for name in ("warmup_steps", "patience", "seed"):
            _check_int(name, getattr(self, name), low=0)
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "min_delta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")


def _check_int(name: str, value: object, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


@dataclass
class ByteDataset:
    """A text's bytes split into training and validation parts.

    Attributes:
        train: ``(N_train,)`` int64 byte values, the first part of the text.
        val: ``(N_val,)`` int64 byte values, the held-out end of the text.
        block_size: the window length the model reads.
    """

    train: Tensor
    val: Tensor
    block_size: int

    @classmethod
    def from_bytes(cls, data: bytes, *, block_size: int, val_fraction: float, source: str = "the text") -> ByteDataset:
        """Splits ``data``; the last ``val_fraction`` of it is the validation part.

        Raises:
            ValueError: either part is shorter than one window of ``block_size + 1`` bytes
                (the message names ``source`` and the size needed).
        """
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long() if data else torch.empty(0, dtype=torch.long)
        n_val = int(len(ids) * val_fraction)
        train, val = ids[: len(ids) - n_val], ids[len(ids) - n_val :]
        need = block_size + 1
        if len(train) < need or len(val) < need:
            minimum = math.ceil(need / min(val_fraction, 1 - val_fraction))
            raise ValueError(
                f"{source} is too short to train on: {len(ids)} bytes; with block_size={block_size} and "
                f"val_fraction={val_fraction} it needs at least {minimum} bytes"
            )
        return cls(train=train, val=val, block_size=block_size)

    @classmethod
    def from_text(cls, text: str, *, block_size: int, val_fraction: float, source: str = "the text") -> ByteDataset:
        """:meth:`from_bytes` of ``text``'s UTF-8 encoding."""
        return cls.from_bytes(text.encode("utf-8"), block_size=block_size, val_fraction=val_fraction, source=source)

    def train_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Random training windows: inputs and next-byte targets, both ``(batch_size, block_size)`` int64."""
        starts = torch.randint(len(self.train) - self.block_size, (batch_size,), generator=generator)
        return _windows(self.train, starts, self.block_size)

    def val_windows(self, count: int | None) -> tuple[Tensor, Tensor]:
        """``count`` validation windows evenly spaced over the split (None: all non-overlapping windows).

        Returns inputs and targets, both ``(count, block_size)`` int64; always the same windows.
        """
        last = len(self.val) - self.block_size - 1
        all_starts = torch.arange(0, last + 1, self.block_size)
        if count is None or count >= len(all_starts):
            starts = all_starts
        else:
            starts = torch.linspace(0, last, count).round().long()
        return _windows(self.val, starts, self.block_size)


def _windows(data: Tensor, starts: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    offsets = starts[:, None] + torch.arange(block_size + 1)  # (B, T + 1)
    chunk = data[offsets]
    return chunk[:, :-1], chunk[:, 1:]


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + math.cos(math.pi * progress))


def next_byte_loss(model: ByteGPT, inputs: Tensor, targets: Tensor, *, reduction: str = "mean") -> Tensor:
    """Mean next-byte cross-entropy in nats of ``(B, T)`` windows, via ``tl.linear_cross_entropy``."""
    hidden = model(inputs)  # (B, T, C); the (B, T, 256) logits are never built
    # Byte targets are always in range, and a NaN/inf loss is reported by the loop with its step,
    # so the per-call input checks are skipped.
    return tl.linear_cross_entropy(hidden, model.lm_head.weight, targets, reduction=reduction, check_inputs=False)


@torch.no_grad()
def evaluate(model: ByteGPT, inputs: Tensor, targets: Tensor, *, batch_size: int = 64) -> float:
    """Mean next-byte loss in nats over ``(N, T)`` windows: summed in batches, divided once at the end."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(inputs), batch_size):
        x, y = inputs[start : start + batch_size], targets[start : start + batch_size]
        total += float(next_byte_loss(model, x, y, reduction="sum"))
        count += y.numel()
    model.train(was_training)
    return total / count


def make_optimizer(model: ByteGPT, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the 2-D weight matrices only (nanoGPT's split)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.ndim >= 2 and not name.startswith(("wte", "wpe")) else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


@dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes:
        model: the trained model with the best validation weights loaded, in eval mode.
        history: the log records (the lines of ``log.jsonl``).
        first_loss: the loss at step 0 (the untrained model), nats.
        best_val_loss: the lowest validation loss seen, nats (of the periodic evaluations).
        best_step: the step where it was seen.
        final_val_loss: the loss of the kept (best) weights on the whole validation split, nats.
        final_train_loss: the last logged training loss, nats.
        steps_run: optimizer steps taken.
        stopped_early: whether early stopping ended the run.
        interrupted_at: the step during which Ctrl-C (KeyboardInterrupt) stopped the run, or None.
        tokens: training tokens (bytes) seen.
        elapsed_s: wall time of the loop, seconds.
        cpu_s: CPU time of this process during the loop, seconds (all threads; on a shared machine
            a better measure of the work than the wall time).
    """

    model: ByteGPT
    history: list[dict] = field(default_factory=list)
    first_loss: float = math.nan
    best_val_loss: float = math.inf
    best_step: int = -1
    final_val_loss: float = math.nan
    final_train_loss: float = math.nan
    steps_run: int = 0
    stopped_early: bool = False
    interrupted_at: int | None = None
    tokens: int = 0
    elapsed_s: float = 0.0
    cpu_s: float = 0.0

    def summary(self) -> dict:
        """The numbers as a JSON-ready dict (no model, no history)."""
        data = {k: v for k, v in asdict(self).items() if k not in ("model", "history")}
        data["final_val_ppl"] = math.exp(self.final_val_loss)
        data["params"] = self.model.num_parameters()
        return data


def train(
    dataset: ByteDataset,
    model_config: GPTConfig,
    config: TrainConfig = TrainConfig(),
    *,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Trains a fresh :class:`ByteGPT` on ``dataset``; see the module docstring for the loop.

    Args:
        dataset: the bytes, split (its ``block_size`` must equal ``model_config.block_size``).
        model_config: the model's sizes.
        config: the training knobs.
        out_dir: if given, ``log.jsonl`` is written there as training goes and the best model
            (``config.json`` + ``model.safetensors``, each renamed into place whole) each time
            validation improves.
        progress: show a tqdm bar (train loss, perplexity, tokens/s, validation loss) on stderr.

    Returns:
        A :class:`TrainResult`; its model holds the best validation weights. Ctrl-C
        (``KeyboardInterrupt``) during the loop ends it like early stopping: the log is kept, the
        model in ``out_dir`` is a loadable one (the best so far, or the current weights if no
        evaluation finished), and ``interrupted_at`` says at which step.

    Raises:
        ValueError: the dataset's block size differs from the model's, or the training loss turns
            NaN/inf (the log up to the step before is kept).
    """
    if dataset.block_size != model_config.block_size:
        raise ValueError(f"dataset block_size {dataset.block_size} != model block_size {model_config.block_size}")
    torch.manual_seed(config.seed)
    model = ByteGPT(model_config)
    model.train()
    optimizer = make_optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    val_inputs, val_targets = dataset.val_windows(config.eval_windows)
    result = TrainResult(model=model)

    log_file = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        log_file = (out_dir / "log.jsonl").open("w")
    bar = _progress_bar(config.steps, progress)
    best_state: dict[str, Tensor] | None = None
    bad_evals = 0
    window_loss, window_steps, window_tokens = 0.0, 0, 0
    start = window_start = time.perf_counter()
    cpu_start = time.process_time()
    step = 0
    try:
        for step in range(config.steps):
            lr = learning_rate(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            inputs, targets = dataset.train_batch(config.batch_size, generator)
            loss = next_byte_loss(model, inputs, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            loss_value = float(loss.detach())
            if step == 0:
                result.first_loss = loss_value
            if not math.isfinite(loss_value):
                raise ValueError(
                    f"training diverged: the loss is {loss_value} at step {step}; try a lower learning rate"
                )

            is_last = step == config.steps - 1
            record = None
            window_loss, window_steps = window_loss + loss_value, window_steps + 1
            window_tokens += targets.numel()
            if step % config.log_interval == 0 or step % config.eval_interval == 0 or is_last:
                now = time.perf_counter()
                mean_loss = window_loss / window_steps
                record = {
                    "step": step,
                    "loss": mean_loss,
                    "ppl": math.exp(mean_loss),
                    "lr": lr,
                    "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                    "elapsed_s": now - start,
                }
                window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, now
            if step % config.eval_interval == 0 or is_last:
                val_loss = evaluate(model, val_inputs, val_targets)
                record.update(val_loss=val_loss, val_ppl=math.exp(val_loss))
                if val_loss < result.best_val_loss - config.min_delta:
                    result.best_val_loss, result.best_step, bad_evals = val_loss, step, 0
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    if out_dir is not None:
                        model.save_pretrained(out_dir)
                else:
                    bad_evals += 1
                window_start = time.perf_counter()  # evaluation time does not count against tokens/s
            optimizer.step()
            result.steps_run = step + 1
            result.tokens += targets.numel()
            if record is not None:
                result.history.append(record)
                result.final_train_loss = record["loss"]
                if log_file is not None:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                bar.set_postfix(_postfix(record, result), refresh=False)
            bar.update(1)
            if config.patience and bad_evals >= config.patience:
                result.stopped_early = True
                break
    except KeyboardInterrupt:
        result.interrupted_at = step
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    result.elapsed_s = time.perf_counter() - start
    result.cpu_s = time.process_time() - cpu_start
    if best_state is not None:
        model.load_state_dict(best_state)
    elif out_dir is not None:  # interrupted before the first evaluation finished: keep a loadable model
        model.save_pretrained(out_dir)
    model.eval()
    result.final_val_loss = evaluate(model, *dataset.val_windows(None))
    return result


def _postfix(record: dict, result: TrainResult) -> dict:
    postfix = {"loss": f"{record['loss']:.3f}", "ppl": f"{record['ppl']:.1f}", "tok/s": f"{record['tokens_per_s']:.0f}"}
    if math.isfinite(result.best_val_loss):
        postfix["val"] = f"{record.get('val_loss', result.best_val_loss):.3f}"
    return postfix


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="train", unit="step", dynamic_ncols=True, leave=True)
