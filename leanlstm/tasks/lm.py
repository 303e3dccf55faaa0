"""Word-level language model head: embedding -> leanlstm.LSTM -> decoder (Zaremba et al. 2014)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..nn import LSTM, FormLinear
from ..nn.structured_dropout import check_dropout_config, check_structured, parse_dropout_mode, structured_forward



@dataclass
class LMConfig:
    vocab_size: int = 10000                                        # PTB's vocabulary
    embed_size: int = 200                                          # width of the word embedding (LSTM input)
    hidden_sizes: list[int] = field(default_factory=lambda: [200, 200])  # per-layer LSTM sizes
    dropout: float = 0.0                                           # on embeddings, between layers, before decoder
    init_range: float = 0.1                                        # uniform(-r, r) for every parameter
    cell: str = "lstm"                                             # recurrent cell of every layer (nn.CELLS)
    cell_options: dict[str, Any] = field(default_factory=dict)     # its options, e.g. {"gate_hidden": 325}
    dropout_mode: str = "standard"     # "structured": masks shared by the batch, new every step, products compacted;
                                       # "structured-window": one mask shared by the batch and the whole window;
                                       # "structured-hybrid": the window's at the stack, per step group at the head
    dropout_steps_per_mask: int = 1    # structured (hybrid: the head): consecutive steps sharing one mask

    def __post_init__(self) -> None:
        check_dropout_config(self.dropout_mode, self.dropout_steps_per_mask)


class WordLM(nn.Module):
    """``forward(tokens, state, targets=None) -> (logits, loss, state)``; tokens are ``(T, B)`` ids.

    The LSTM may carry any weight forms; ``lstm_config`` (stored in checkpoints) records them.
    """

    def __init__(self, config: LMConfig, lstm_config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embed_size)
        if lstm_config is None:
            self.lstm = LSTM(config.embed_size, config.hidden_sizes, dropout=config.dropout, cell=config.cell,
                             cell_options=config.cell_options)
        else:
            self.lstm = LSTM.from_config(lstm_config)
        self.dropout = nn.Dropout(config.dropout)
        self.decoder = nn.Linear(_layer_sizes(self.lstm)[-1], config.vocab_size)
        check_structured(self.lstm, config.dropout_mode)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r = self.config.init_range
        self.lstm.reset_parameters(r)
        for parameter in (self.embedding.weight, self.decoder.weight, self.decoder.bias):
            nn.init.uniform_(parameter, -r, r)

    def init_state(self, batch_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        weight = self.embedding.weight  # follows device and dtype (the decoder may be a FormLinear)
        zeros = [weight.new_zeros(1, batch_size, size) for size in _layer_sizes(self.lstm)]
        return zeros, [z.clone() for z in zeros]

    def forward(self, tokens: torch.Tensor, state=None, targets: torch.Tensor | None = None):
        if state is None:
            state = self.init_state(tokens.shape[1])
        if self._structured():
            logits, state = self._forward_structured(tokens, state)
        else:
            embedded = self.dropout(self.embedding(tokens))        # (T, B, E)
            h, c = _per_layer(state)
            if isinstance(self.lstm, nn.LSTM):  # a plain torch.nn.LSTM (the baseline) wants stacked state
                h, c = torch.cat(h), torch.cat(c)
            output, state = self.lstm(embedded, (h, c))            # (T, B, H)
            logits = self.decoder(self.dropout(output))            # (T, B, V)
        loss = None
        if targets is not None:
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss, _per_layer(state)

    def _structured(self) -> bool:
        return (self.training and self.config.dropout > 0 and self.config.dropout_mode != "standard"
                and not isinstance(self.lstm, nn.LSTM))

    def _forward_structured(self, tokens: torch.Tensor, state):
        """Training forward with structured dropout (``leanlstm.nn.structured_dropout``): the embedding-output and
        between-layer sites are compacted in each layer's input product, the last one in the decoder's."""
        return structured_forward(self.lstm, self.decoder, self.embedding(tokens), state, self.config.dropout,
                                  self.config.dropout_mode, self.config.dropout_steps_per_mask)

    def set_dropout(self, dropout: float) -> None:
        """Change the dropout rate everywhere it applies (e.g. a lower rate while a method shrinks the model,
        as ISS does); recorded in ``config`` so checkpoints keep it."""
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.config = replace(self.config, dropout=dropout)   # a copy: the config may be a preset's, shared
        self.dropout.p = dropout
        self.lstm.dropout = dropout   # between layers (torch.nn.LSTM and leanlstm.LSTM alike)

    def set_dropout_mode(self, mode: str) -> None:
        """A dropout mode (``LMConfig.dropout_mode``; ``MODE/N``: N steps per mask) from now on; kept in
        checkpoints."""
        mode, steps = parse_dropout_mode(mode)
        config = replace(self.config, dropout_mode=mode,
                         dropout_steps_per_mask=steps or self.config.dropout_steps_per_mask)
        check_structured(self.lstm, mode)
        self.config = config

    def model_config(self) -> dict[str, Any]:
        config = {"kind": "word_lm", "lm": asdict(self.config), "lstm": self.lstm.config()}
        if isinstance(self.decoder, FormLinear):        # a compressed decoder (Prune(heads=...)): its form too
            config["decoder"] = self.decoder.config()
        return config

    @classmethod
    def from_model_config(cls, config: dict[str, Any]) -> "WordLM":
        lm_config = LMConfig(**config["lm"])
        lm_config.hidden_sizes = list(config["lstm"]["hidden_size"])
        model = cls(lm_config, config["lstm"])
        if "decoder" in config:
            model.decoder = FormLinear.from_config(config["decoder"])
        return model


def _layer_sizes(lstm: nn.Module) -> list[int]:
    if isinstance(lstm, nn.LSTM):
        return [lstm.hidden_size] * lstm.num_layers
    return lstm.hidden_sizes


@torch.fx.wrap
def _per_layer(state):
    """The LSTM returns stacked tensors for equal sizes; keep per-layer lists so state shapes never vary.

    One node in a ``torch.fx`` trace (``leanlstm.graph`` reads models that way): it branches on types."""
    h, c = state
    if isinstance(h, torch.Tensor):
        return list(h.split(1)), list(c.split(1))
    return list(h), list(c)


def detach_state(state):
    """Cut the graph between BPTT windows."""
    h, c = state
    return [t.detach() for t in h], [t.detach() for t in c]


@torch.no_grad()
def evaluate_stream(model: nn.Module, columns: torch.Tensor, bptt: int) -> float:
    """Mean next-word loss of ``model`` over token columns ``(T, B)`` (``ptb.batchify``), read in BPTT windows
    with the state carried across them, in eval mode."""
    was_training = model.training
    model.eval()
    state, total, count = None, 0.0, 0
    for start in range(0, columns.shape[0] - 1, bptt):
        length = min(bptt, columns.shape[0] - 1 - start)
        inputs, targets = columns[start:start + length], columns[start + 1:start + 1 + length]
        _, loss, state = model(inputs, state, targets)
        total += float(loss) * targets.numel()
        count += targets.numel()
    model.train(was_training)
    return total / count
