"""The loss options, listed once, and the preparation every implementation shares.

:class:`LossOptions` is the one place that lists the options of the loss. Every entry point
(:func:`tokenloss.cross_entropy`, :func:`tokenloss.linear_cross_entropy`, the vocabulary-parallel
functions, the ``nn.Module`` wrappers and the float64 reference) gets them through
:func:`takes_loss_options`, which adds each field as a keyword-only argument to the public
signature and hands the function one checked ``LossOptions``. A new option is one field here (and
its use in the per-row math); no signature is written twice.

Every path then takes the user's tensors through :func:`prepare_targets`: it checks shapes and
dtypes, applies the causal shift to the *targets* (never copying the logits), folds
``ignore_index``, ``mask`` and ``token_weights`` into one per-row weight, and computes the
denominator of the mean. What is left for an implementation is the per-row math of
:mod:`tokenloss.ops.rowwise` on ``(N, V)`` rows.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _option(default, doc: str):
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class LossOptions:
    """The options of the loss, checked once. Every entry point takes each field as a keyword.

    Raises:
        TypeError, ValueError: an option of the wrong type or out of range, naming it.

    Examples:
        >>> LossOptions(label_smoothing=0.1).label_smoothing
        0.1
        >>> LossOptions(reduction="avg")
        Traceback (most recent call last):
        ...
        ValueError: reduction must be one of ('mean', 'sum', 'none'), got 'avg'
    """

    ignore_index: int = _option(-100, "positions whose target equals this do not count (PyTorch's default)")
    shift: bool | int = _option(
        False,
        "causal-LM shift: the input at position t predicts the target at t + 1 along the sequence "
        "dimension (the input's second-to-last, the targets' last); mask and token weights shift with "
        "the targets, and every count is taken after the shift. An int k >= 0 predicts t + k "
        "(multi-token prediction heads); True is 1, False is 0",
    )
    reduction: str = _option(
        "mean",
        '"mean" (sum over counted positions / their number, or / num_items), "sum", or "none" '
        "(per-position losses shaped like the targets after the shift, 0.0 where a position does not count)",
    )
    label_smoothing: float = _option(
        0.0, "eps in [0, 1]: the target becomes (1 - eps) * onehot + eps / V (PyTorch's definition)"
    )
    z_loss: float = _option(0.0, "coefficient of logsumexp(z) ** 2 added per counted position (PaLM); >= 0")
    softcap: float | None = _option(None, "c > 0: logits become c * tanh(logits / c) first (Gemma 2); None: no cap")
    focal_gamma: float = _option(0.0, "gamma >= 0: each position's cross-entropy times (1 - p_target) ** gamma")
    check_inputs: bool = _option(
        True,
        "check that counted targets are in [0, V) and that no counted row holds NaN/inf "
        "(each one host sync on CUDA); False skips both",
    )
    chunk_size: int | None = _option(
        None, "rows per chunk of the (n, V) work buffer; None picks one from N, V and free memory"
    )

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        _check_number("label_smoothing", self.label_smoothing, low=0.0, high=1.0)
        _check_number("z_loss", self.z_loss, low=0.0)
        _check_number("focal_gamma", self.focal_gamma, low=0.0)
        if self.softcap is not None:
            _check_number("softcap", self.softcap, low=0.0)
            if self.softcap == 0:
                raise ValueError("softcap must be a positive number or None, got 0")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        if not -(2**63) <= self.ignore_index < 2**63:
            raise ValueError(f"ignore_index must fit in int64 (targets are int64), got {self.ignore_index}")
        if not isinstance(self.shift, int) or (not isinstance(self.shift, bool) and self.shift < 0):
            raise TypeError(f"shift must be a bool or an int >= 0 (steps ahead), got {self.shift!r}")
        if not isinstance(self.check_inputs, bool):
            raise TypeError(f"check_inputs must be a bool, got {self.check_inputs!r}")
        if self.chunk_size is not None and (
            isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be a positive int (rows per chunk) or None, got {self.chunk_size!r}")

    @property
    def shift_steps(self) -> int:
        """How many positions ahead the targets are: ``int(shift)`` (True is 1)."""
        return int(self.shift)

    def as_kwargs(self) -> dict[str, object]:
        """The options as keyword arguments of any entry point."""
        return {name: getattr(self, name) for name in OPTION_NAMES}


#: The names of the options, in signature order.
OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(LossOptions))


def _check_number(name: str, value: object, *, low: float, high: float = math.inf) -> None:
    """A finite real number in ``[low, high]``, or TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (low <= value <= high) or not math.isfinite(value):
        bounds = f"in [{low}, {high}]" if high != math.inf else f"a finite number >= {low}"
        raise ValueError(f"{name} must be {bounds}, got {value}")


def _options_doc() -> str:
    lines = ["Loss options (keyword-only; :class:`tokenloss.options.LossOptions` lists and checks them):"]
    for f in fields(LossOptions):
        lines.append(f"    {f.name} (default {f.default!r}): {f.metadata['doc']}.")
    return "\n".join(lines)


def takes_loss_options(function):
    """Decorator: gives ``function`` every :class:`LossOptions` field as a keyword-only argument.

    ``function`` declares a keyword-only ``options: LossOptions`` parameter. The wrapper's
    signature (what ``help`` and ``inspect.signature`` show) replaces it with one keyword per field,
    with its default; a call gathers those keywords into one checked ``LossOptions``. A caller that
    already holds a ``LossOptions`` may pass it as ``options=`` instead of the separate keywords.
    The docstring gains the list of the options.
    """
    signature = inspect.signature(function)
    if "options" not in signature.parameters:
        raise TypeError(f"{function.__qualname__} must take a keyword-only 'options' parameter")
    option_parameters = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
        for f in fields(LossOptions)
    ]
    parameters = []
    for parameter in signature.parameters.values():
        if parameter.name == "options":
            parameters.extend(option_parameters)
        else:
            parameters.append(parameter)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        given = {name: kwargs.pop(name) for name in OPTION_NAMES if name in kwargs}
        options = kwargs.pop("options", None)
        if options is None:
            options = LossOptions(**given)
        elif not isinstance(options, LossOptions):
            raise TypeError(f"options must be a tokenloss.options.LossOptions, got {type(options).__name__}")
        elif given:
            raise TypeError(f"pass either options= or the separate options, not both (got {', '.join(given)})")
        return function(*args, options=options, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=parameters)
    if function.__doc__:
        wrapper.__doc__ = inspect.cleandoc(function.__doc__) + "\n\n" + _options_doc()
    return wrapper


@dataclass
class ClassWeights:
    """Per-class weights (PyTorch's ``weight``) as the per-row math needs them.

    Attributes:
        weight: ``(V,)`` the weights of the classes.
        of_target: ``(N,)`` the weight of each row's target class (0 where the row does not count).
    """

    weight: Tensor
    of_target: Tensor

    def rows(self, index: slice | Tensor) -> ClassWeights:
        """The same weights for a subset of the rows."""
        return ClassWeights(self.weight, self.of_target[index])


@dataclass
class PreparedTargets:
    """Targets flattened to rows, with everything the per-row math needs.

    Attributes:
        targets: ``(N,)`` int64; rows that do not count hold 0 so that gathers stay in range.
        weights: ``(N,)`` float32 (float64 for float64 token weights); 0 for rows that do not count,
            the token weight (or 1) otherwise.
        counted: ``(N,)`` bool; True where the row counts.
        denominator: 0-dim float32 tensor that the summed loss is divided by for ``"mean"``.
        class_weights: the per-class weights and each row's target's weight
            (:class:`ClassWeights`), or None.
        out_shape: shape of the ``"none"`` result (the targets' shape after the shift).
        rows_shape: the targets' shape before the shift: the rows are laid out in it, and the
            last ``shift`` positions of each sequence (which never count) are cut from a
            ``"none"`` result.
    """

    targets: Tensor
    weights: Tensor
    counted: Tensor
    denominator: Tensor
    out_shape: tuple[int, ...]
    rows_shape: tuple[int, ...]
    class_weights: ClassWeights | None = None

    def reduce(self, row_losses: Tensor, reduction: str) -> Tensor:
        """Turns ``(N,)`` float32 per-row losses into the requested reduction."""
        if reduction == "sum":
            return row_losses.sum()
        if reduction == "mean":
            return row_losses.sum() / self.denominator
        per_token = row_losses.view(self.rows_shape)
        if self.out_shape == self.rows_shape:
            return per_token
        return per_token[..., : self.out_shape[-1]]


def _refuse_functorch(name: str, tensor: Tensor) -> None:
    """NotImplementedError for a tensor under a ``torch.func`` transform (``grad``, ``vmap``, ...)."""
    if torch.compiler.is_compiling():  # Dynamo cannot trace the probe; compiled code sees plain tensors
        return
    wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    if wrapped is not None and wrapped(tensor):
        raise NotImplementedError(
            f"{name} is under a torch.func transform (grad, vmap, jacrev, ...), which tokenloss's autograd "
            "Functions do not support; call tokenloss outside the transform, or use "
            "tokenloss.reference.reference_cross_entropy inside it"
        )


def check_logits(logits: Tensor, name: str = "logits") -> None:
    """Raises TypeError/ValueError unless ``logits`` is a floating ``(..., V)`` tensor with V >= 1
    (NotImplementedError under a ``torch.func`` transform)."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    _refuse_functorch(name, logits)
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{name} must have shape (..., V) with V >= 1, got {tuple(logits.shape)}")


def check_linear_inputs(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *,
    weight_name: str = "weight",
    bias_name: str = "bias",
    hidden_name: str = "hidden",
) -> None:
    """Raises TypeError/ValueError unless hidden ``(..., D)``, weight ``(V, D)``, bias ``(V,)`` agree
    in shape, dtype and device (the names in messages are the caller's: ``weight_shard`` ...)."""
    for name, tensor in ((hidden_name, hidden), (weight_name, weight), (bias_name, bias)):
        if tensor is None and name == bias_name:
            continue
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        _refuse_functorch(name, tensor)
        if tensor.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {tensor.dtype}")
    if hidden.ndim < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"{hidden_name} must have shape (..., D) with D >= 1, got {tuple(hidden.shape)}")
    if weight.ndim != 2 or weight.shape[0] < 1 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{weight_name} must have shape (V, D) = (V, {hidden.shape[-1]}) with V >= 1 (D from {hidden_name}), "
            f"got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{bias_name} must have shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    for name, tensor in ((weight_name, weight), (bias_name, bias)):
        if tensor is None:
            continue
        if tensor.dtype != hidden.dtype:
            raise TypeError(f"{name} must have the dtype of {hidden_name} ({hidden.dtype}), got {tensor.dtype}")
        if tensor.device != hidden.device:
            raise ValueError(f"{name} must be on the device of {hidden_name} ({hidden.device}), got {tensor.device}")


# The name of the input's last dimension, for messages.
_LAST_DIMENSION = {"logits": "V", "hidden": "D", "logits_shard": "V_local"}


def prepare_targets(
    leading_shape: tuple[int, ...],
    targets: Tensor,
    vocab_size: int | None,
    options: LossOptions,
    *,
    mask: Tensor | None = None,
    token_weights: Tensor | None = None,
    num_items: int | float | Tensor | None = None,
    class_weight: Tensor | None = None,
    class_weight_name: str = "weight",
    input_name: str = "logits",
    device: torch.device | None = None,
) -> PreparedTargets:
    """Checks targets and their companions against the input's leading shape and flattens them.

    Args:
        leading_shape: the input's shape without its last dimension (``logits.shape[:-1]`` or
            ``hidden.shape[:-1]``).
        targets: ``(*leading_shape)`` integer tensor.
        vocab_size: V, for the range check of targets (None skips it: vocab-parallel shards
            check against the global V themselves).
        options: the checked loss options (``shift`` and ``ignore_index`` are applied here).
        mask: optional bool tensor shaped like ``targets``; True marks positions that count.
        token_weights: optional floating tensor shaped like ``targets``; finite where a position
            counts (checked unless ``options.check_inputs`` is False).
        num_items: optional count that the summed loss is divided by for ``"mean"``.
        class_weight: optional ``(V,)`` floating tensor of per-class weights, finite and >= 0 (as
            PyTorch's ``weight``): without ``num_items`` the mean divides by the summed class
            weights of the counted targets.
        class_weight_name: its name in error messages.
        input_name: the name of the input in error messages.
        device: the input's device; every tensor argument must be on it (None: not checked).

    Raises:
        TypeError: targets not integer, mask not bool, token_weights not floating.
        ValueError: shapes that do not match, targets out of ``[0, V)`` that are not
            ``ignore_index``, a shift without a sequence dimension, a negative or NaN ``num_items``.
    """
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor (int64 class indices), got {targets.dtype}")
    if tuple(targets.shape) != tuple(leading_shape):
        raise ValueError(
            f"targets must have shape {tuple(leading_shape)} (the shape of {input_name} without its last "
            f"dimension), got {tuple(targets.shape)}"
        )
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise TypeError(f"mask must be a bool tensor (True = position counts), got {got}")
        if mask.shape != targets.shape:
            raise ValueError(f"mask must have the shape of targets {tuple(targets.shape)}, got {tuple(mask.shape)}")
    if token_weights is not None:
        if not isinstance(token_weights, Tensor) or not token_weights.dtype.is_floating_point:
            got = token_weights.dtype if isinstance(token_weights, Tensor) else type(token_weights).__name__
            raise TypeError(f"token_weights must be a floating tensor, got {got}")
        if token_weights.shape != targets.shape:
            raise ValueError(
                f"token_weights must have the shape of targets {tuple(targets.shape)}, got {tuple(token_weights.shape)}"
            )
    if device is not None:
        for name, tensor in (("targets", targets), ("mask", mask), ("token_weights", token_weights)):
            if tensor is not None and tensor.device != device:
                raise ValueError(f"{name} must be on the device of {input_name} ({device}), got {tensor.device}")
    steps = options.shift_steps
    if steps and targets.ndim < 1:
        last = _LAST_DIMENSION.get(input_name, "V")
        raise ValueError(f"shift=True needs {input_name} shaped (..., T, {last}): a sequence dimension, got none")

    targets = targets.long()
    rows_shape = tuple(targets.shape)
    out_shape = rows_shape
    if steps:
        # Shift the targets left instead of slicing the input: slicing (B, T, V) logits to
        # (B, T-k, V) and flattening would copy all of them. The last k positions of each sequence
        # get ignore_index and are cut from a "none" result.
        length = rows_shape[-1]
        kept = max(length - steps, 0)

        def shifted(tensor: Tensor, fill) -> Tensor:
            pad = torch.full_like(tensor[..., : length - kept], fill)
            return torch.cat([tensor[..., length - kept :], pad], dim=-1)

        targets = shifted(targets, options.ignore_index)
        if mask is not None:
            mask = shifted(mask, False)
        if token_weights is not None:
            token_weights = shifted(token_weights, 0.0)
        out_shape = rows_shape[:-1] + (kept,)

    targets = targets.reshape(-1)
    counted = targets != options.ignore_index
    if mask is not None:
        counted = counted & mask.reshape(-1)
    if options.check_inputs and vocab_size is not None:
        check_target_range(targets, counted, vocab_size, options.ignore_index)
    safe_targets = torch.where(counted, targets, torch.zeros_like(targets))
    # float64 token weights stay float64 (a float64 loss would otherwise see them rounded to float32)
    weights_dtype = (
        torch.float64 if token_weights is not None and token_weights.dtype == torch.float64 else torch.float32
    )
    weights = counted.to(weights_dtype)
    if token_weights is not None:
        weights = torch.where(counted, token_weights.reshape(-1).to(weights_dtype), weights)
        if options.check_inputs and targets.numel() > 0 and not bool(torch.isfinite(weights).all()):
            raise ValueError(
                "token_weights must be finite where a position counts; found NaN or inf "
                "(pass check_inputs=False to skip this check)"
            )

    class_weights = None
    if class_weight is not None:
        class_weight = check_class_weight(class_weight, vocab_size, device, options.check_inputs, class_weight_name)
        of_target = torch.where(counted, class_weight[safe_targets], torch.zeros_like(class_weight[:1]))
        class_weights = ClassWeights(class_weight, of_target)
    if num_items is not None:
        denominator = _num_items_tensor(num_items, counted, options.check_inputs)
    elif class_weights is not None:  # PyTorch's weighted mean; 1 where the weights sum to 0
        total = class_weights.of_target.sum()
        denominator = torch.where(total > 0, total, torch.ones_like(total))
    else:
        denominator = counted.sum().clamp(min=1).float()
    return PreparedTargets(safe_targets, weights, counted, denominator, out_shape, rows_shape, class_weights)


def check_class_weight(
    class_weight: Tensor, vocab_size: int | None, device: torch.device | None, check_values: bool, name: str = "weight"
) -> Tensor:
    """The per-class weights as a ``(V,)`` float32 tensor (float64 for float64 weights).

    Raises:
        TypeError: not a floating tensor.
        ValueError: not shaped ``(V,)``, on another device, or (``check_values``) NaN, inf or negative.
    """
    if not isinstance(class_weight, Tensor) or not class_weight.dtype.is_floating_point:
        got = class_weight.dtype if isinstance(class_weight, Tensor) else type(class_weight).__name__
        raise TypeError(f"{name} must be a floating tensor of per-class weights, got {got}")
    if vocab_size is None:
        raise ValueError(f"{name} (per-class weights) is not supported here")
    if tuple(class_weight.shape) != (vocab_size,):
        raise ValueError(f"{name} must have shape (V,) = ({vocab_size},), got {tuple(class_weight.shape)}")
    if device is not None and class_weight.device != device:
        raise ValueError(f"{name} must be on the device of the inputs ({device}), got {class_weight.device}")
    if check_values and not bool((torch.isfinite(class_weight) & (class_weight >= 0)).all()):
        raise ValueError(f"{name} must be finite and >= 0 for every class (pass check_inputs=False to skip this check)")
    return class_weight.to(torch.float64 if class_weight.dtype == torch.float64 else torch.float32)


def check_target_range(targets: Tensor, counted: Tensor, vocab_size: int, ignore_index: int, where: str = "") -> None:
    """Raises ValueError if a counted target lies outside ``[0, vocab_size)`` (one host sync on CUDA).

    Args:
        targets: ``(N,)`` int64 class ids.
        counted: ``(N,)`` bool, True where the row counts.
        vocab_size: V.
        ignore_index: for the message.
        where: words placed after the range in the message (e.g. which vocabulary is meant).
    """
    if targets.numel() == 0:
        return
    bad = counted & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        value = int(targets[bad][0])
        raise ValueError(
            f"targets must be in [0, {vocab_size}){where} or equal ignore_index={ignore_index}; "
            f"found {value} at {int(bad.sum())} position(s)"
        )


def _num_items_tensor(num_items: int | float | Tensor, counted: Tensor, check: bool) -> Tensor:
    """The denominator of ``"mean"`` from ``num_items``: exactly ``num_items`` (0.5 divides by 0.5, as
    the Hugging Face loss does), or 1 where it is 0 and so nothing counts anywhere (the loss is 0).

    Raises:
        TypeError: not a number or a tensor.
        ValueError: a tensor of more than one element; NaN, infinite or negative; 0 while some
            position counts (a tensor is checked only with ``check``: one host sync on CUDA).
    """
    if isinstance(num_items, Tensor):
        if num_items.numel() != 1:
            raise ValueError(f"num_items must be a number or a 1-element tensor, got shape {tuple(num_items.shape)}")
        if num_items.dtype == torch.bool or num_items.is_complex():
            raise TypeError(f"num_items must be a real number or tensor, got {num_items.dtype}")
        value = num_items.reshape(()).to(device=counted.device, dtype=torch.float32)
        if check:
            _check_num_items(float(value), counted)
        return torch.where(value == 0, torch.ones_like(value), value)
    if isinstance(num_items, bool) or not isinstance(num_items, (int, float)):
        raise TypeError(f"num_items must be a number or a tensor, got {type(num_items).__name__}")
    _check_num_items(float(num_items), counted)
    return torch.tensor(float(num_items) if num_items != 0 else 1.0, device=counted.device)


def _check_num_items(value: float, counted: Tensor) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"num_items must be a finite number >= 0 (the number of counted tokens), got {value}")
    if value == 0 and counted.numel() > 0 and bool(counted.any()):
        raise ValueError(
            f"num_items is 0 but {int(counted.sum())} position(s) count here: pass the number of counted tokens "
            "of the whole step (tokenloss.distributed.global_num_items)"
        )
