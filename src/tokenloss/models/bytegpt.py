"""A small byte-level GPT in plain PyTorch, its safetensors format, and the model shipped in the package.

The tokenizer is the identity on UTF-8: token id = byte value, vocabulary size 256, no BOS token.
The model is a standard pre-norm decoder (learned positions, causal self-attention, GELU MLP),
small enough to train on a laptop CPU in minutes (:mod:`tokenloss.training.loop`).

``forward`` returns the final-norm hidden states and leaves the projection to the vocabulary to
the loss (``tl.linear_cross_entropy(hidden, model.lm_head.weight, targets)``), so that training
never has to hold the ``(B, T, 256)`` logits; :meth:`ByteGPT.logits` does the projection for
scoring. ``lm_head`` starts at zero: every initial logit is 0, the initial prediction is uniform
and the first loss is exactly ``log 256 = 5.545`` nats.

The on-disk format is a directory with ``config.json`` (the :class:`GPTConfig` fields plus
``"model_type": "tokenloss-bytegpt"``) and ``model.safetensors`` (float32 weights).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tokenloss.utils.files import atomic_path, write_text_atomically

MODEL_TYPE = "tokenloss-bytegpt"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
VOCAB_SIZE = 256


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a :class:`ByteGPT`.

    Attributes:
        vocab_size: number of token ids; 256 for bytes.
        block_size: the longest sequence (context) the model reads.
        n_layer: transformer blocks.
        n_head: attention heads per block; must divide ``n_embd``.
        n_embd: width of the hidden states.
        dropout: dropout probability in training (0 disables it).
        bias: whether the linear layers and layer norms carry biases (``lm_head`` never does).
    """

    vocab_size: int = VOCAB_SIZE
    block_size: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict, with ``model_type`` added."""
        return {"model_type": MODEL_TYPE, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> GPTConfig:
        """Builds a config from :meth:`to_dict` output.

        Raises:
            ValueError: ``model_type`` is not ``"tokenloss-bytegpt"`` or a field is unknown.
        """
        if data.get("model_type") != MODEL_TYPE:
            raise ValueError(f"not a ByteGPT config: model_type is {data.get('model_type')!r}, expected {MODEL_TYPE!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"model_type"})
        if unknown:
            raise ValueError(f"unknown ByteGPT config fields: {', '.join(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in known})


def encode(text: str) -> list[int]:
    """Token ids of ``text``: its UTF-8 bytes."""
    return list(text.encode("utf-8"))


def decode(ids: list[int] | Tensor) -> str:
    """Text of token ids (UTF-8; broken multi-byte sequences become U+FFFD)."""
    if isinstance(ids, Tensor):
        ids = ids.tolist()
    return bytes(ids).decode("utf-8", errors="replace")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention on ``(B, T, C)``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        batch, time, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)  # 3 x (B, T, C)
        shape = (batch, time, self.n_head, width // self.n_head)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))  # (B, H, T, C/H)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)  # (B, H, T, C/H)
        y = y.transpose(1, 2).reshape(batch, time, width)
        return F.dropout(self.proj(y), dropout, self.training)


class MLP(nn.Module):
    """The position-wise feed-forward layer, 4x wide, GELU."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.down = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(self.down(F.gelu(self.up(x))), self.dropout, self.training)


class Block(nn.Module):
    """One pre-norm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ByteGPT(nn.Module):
    """A byte-level GPT: ``forward(idx)`` gives the hidden states, ``lm_head`` projects them to 256 logits.

    Args:
        config: the sizes (:class:`GPTConfig`).

    Attributes:
        config: the :class:`GPTConfig`.
        lm_head: ``nn.Linear(n_embd, vocab_size, bias=False)``, zero at initialisation.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2's scheme: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer) so the
        # residual stream does not grow with depth; lm_head zero for an exactly uniform start.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.down):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))
        nn.init.zeros_(self.lm_head.weight)

    def num_parameters(self) -> int:
        """The number of trainable parameters."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: Tensor) -> Tensor:
        """Final-norm hidden states of a batch of byte sequences.

        Args:
            idx: ``(B, T)`` integer token ids in ``[0, vocab_size)``, ``T <= block_size``.

        Returns:
            ``(B, T, n_embd)`` hidden states in the parameters' dtype; position ``t`` sees
            tokens ``0..t`` only.

        Raises:
            TypeError: ``idx`` is not an integer tensor.
            ValueError: ``idx`` is not 2-D, is longer than ``block_size`` or is empty.
        """
        if not isinstance(idx, Tensor) or idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise TypeError(f"idx must be an integer tensor, got {getattr(idx, 'dtype', type(idx).__name__)}")
        if idx.ndim != 2 or idx.shape[1] == 0:
            raise ValueError(f"idx must be shaped (B, T) with T >= 1, got {tuple(idx.shape)}")
        time = idx.shape[1]
        if time > self.config.block_size:
            raise ValueError(f"sequence length {time} exceeds the model's block_size {self.config.block_size}")
        positions = torch.arange(time, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)  # (B, T, C)

    def logits(self, idx: Tensor) -> Tensor:
        """Next-byte logits: ``(B, T)`` ids -> ``(B, T, vocab_size)`` float32 (position ``t`` predicts ``t + 1``)."""
        return self.lm_head(self(idx)).float()

    def save_pretrained(self, directory: str | Path) -> Path:
        """Writes ``config.json`` and ``model.safetensors`` (float32) into ``directory``; returns it."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # Each file is renamed into place whole: an interrupted save leaves the previous file or the new one.
        write_text_atomically(directory / CONFIG_NAME, json.dumps(self.config.to_dict(), indent=2) + "\n")
        state = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in self.state_dict().items()}
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "model_type": MODEL_TYPE})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device: str | torch.device = "cpu") -> ByteGPT:
        """Loads a model written by :meth:`save_pretrained`, in eval mode.

        Raises:
            FileNotFoundError: ``directory``, its ``config.json`` or ``model.safetensors`` is missing.
            ValueError: the config is not a ByteGPT config, the weights file is empty, truncated or
                corrupt, or the weights do not fit the config.
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"no ByteGPT {name} in {directory}")
        try:
            config = GPTConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
        except (ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError
            raise ValueError(f"{directory / CONFIG_NAME} is not a valid ByteGPT config: {error}") from None
        model = cls(config)
        try:
            state = load_file(str(directory / WEIGHTS_NAME))
        except Exception as error:  # safetensors' own SafetensorError: empty, truncated or corrupt file
            raise ValueError(
                f"{directory / WEIGHTS_NAME} cannot be read ({error}): the file is empty, truncated or corrupt; "
                "save or copy the model again"
            ) from None
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(f"the weights in {directory / WEIGHTS_NAME} do not fit its config: {error}") from None
        return model.to(device).eval()


def is_bytegpt_dir(directory: str | Path) -> bool:
    """Whether ``directory`` holds a ``config.json`` with ``"model_type": "tokenloss-bytegpt"``."""
    path = Path(directory) / CONFIG_NAME
    try:
        return json.loads(path.read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def builtin_path() -> Path:
    """The directory of the model that ships inside the package (``tokenloss/assets/bytegpt``)."""
    return Path(str(resources.files("tokenloss") / "assets" / "bytegpt"))


def load_builtin(device: str | torch.device = "cpu") -> ByteGPT:
    """The byte-level GPT trained with ``tokenloss train``'s defaults that ships in the package, in eval mode.

    How it was trained (seed, command, final losses) is in ``assets/bytegpt/training.json``.
    """
    return ByteGPT.from_pretrained(builtin_path(), device=device)
