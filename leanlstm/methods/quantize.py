"""int8 weights: post-training quantisation, and quantisation-aware fine-tuning: ``leanlstm.Int8``, method ``int8``.

``compress_(model, Int8())`` snaps every value tensor of every LSTM matrix (any form: a dense matrix, low-rank
factors, the kept entries of a sparse one, a doped form's parts, AntMan's blocks), every ``nn.Linear`` head and
every ``nn.Embedding`` table to its per-row int8 grid (``leanlstm.nn.quant``), the grid the int8 engine computes
and stores with, and records the value width on the forms, so that ``nbytes()`` and every compression factor count
1-byte values plus one float32 scale per row. The model is then the quantised model: PyTorch evaluates exactly the
weights the engine runs.

Calibration: ``clip="max"`` (the default) uses each row's largest magnitude; ``clip="mse"`` picks each row's scale
by least squared error over clipping candidates (with 255 levels per row it lowers the weights' squared error by
under 2% on Gaussian rows of 650-4096 entries, and not at all on heavy-tailed rows: there clipping one outlier costs
more than the finer grid gains). At ``bits=4`` (15 levels a row, block-sparse forms) it does: on PTB `small` pruned
to 60x in 4-bit blocks, test 115.71 with it against 116.96 without. No data is needed for weights; activations are
quantised by the engine per step and per vector at run time (dynamic), so no activation ranges are calibrated.

Quantisation-aware fine-tuning: train after ``compress_`` and call ``handle.after_step()`` after every optimiser
step; the step's change goes to float latent weights, which are snapped again (straight-through estimator).
``leanlstm compress --method int8 --from RUN`` quantises with no training (``--epochs`` defaults to 0 for this
method) and measures; ``--finetune-epochs N`` adds N epochs of quantisation-aware fine-tuning.

    handle = leanlstm.compress_(model, leanlstm.Int8())      # post-training quantisation
    ...  loss.backward(); optimizer.step(); handle.after_step()   # optional: quantisation-aware fine-tuning
    handle.finalize()
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..nn.quant import BITS, CLIPS, QUANT_BITS, Latent, lstm_bits, quantise_, quantised_parameters
from .base import Method, MethodConfig
from .pruning import weight_compression

if TYPE_CHECKING:
    from ..compress import Compression


@dataclass
class Int8(MethodConfig):
    """int8 weights with one scale per row, for the LSTM matrices and (``heads``) every ``nn.Linear``.

    >>> Int8().clip, Int8(clip="mse").heads
    ('max', True)
    """

    clip: str = "max"         # each row's scale: its largest magnitude ("max"), or least squared error ("mse")
    heads: bool = True        # quantise the model's nn.Linear layers too (the int8 engine runs them in int8)
    embeddings: bool = True   # and its nn.Embedding tables (the int8 engine stores them in int8, a scale per row)
    bits: int = BITS          # the LSTM matrices' value width: 8, or 4 (block-sparse forms only; heads stay int8)

    choices = {"clip": CLIPS, "bits": QUANT_BITS}


class Int8Method(Method):
    """Post-training int8 quantisation; training after it is quantisation-aware (latent weights)."""

    name = "int8"
    Config = Int8
    compress_epochs = 0          # post-training: no training before quantising
    finetune_epochs = 0          # quantisation-aware fine-tuning only when asked (--finetune-epochs)
    latency_backends = ("leanlstm-int8", "leanlstm", "torch-int8", "onnxruntime", "onnxruntime-int8")

    def __init__(self, config: Int8 | None = None) -> None:
        super().__init__(config)
        self.latent: Latent | None = None
        self._saved: dict[str, Any] | None = None

    def check(self, handle: "Compression") -> None:
        lstm_bits(handle.forms(), self.config.bits)        # a width the forms cannot store fails before any change

    def convert(self, handle: "Compression") -> None:
        c = self.config
        quantise_(handle.model, c.clip, c.heads, handle.forms(), c.embeddings, c.bits)

    def start(self, handle: "Compression") -> None:
        parameters = quantised_parameters(handle.model, self.config.heads, handle.forms(), self.config.embeddings)
        if self.latent is None or [p for _, p, _ in self.latent.parameters] != [p for _, p, _ in parameters]:
            self.latent = Latent(parameters, self.config.clip,       # the model's parameters were (re)built
                                 lstm_bits(handle.forms(), self.config.bits))
        if self._saved is not None:
            self.latent.load_state_dict(self._saved)
            self._saved = None

    def after_step(self, handle: "Compression") -> None:
        self.latent.update()

    def finish(self, handle: "Compression") -> None:
        self.latent.snap_all()

    def summarize(self, handle: "Compression") -> dict[str, Any]:
        return {"value_bits": self.config.bits, "weight_compression": weight_compression(handle.model),
                "quantised_tensors": len(quantised_parameters(handle.model, self.config.heads, handle.forms()))}

    def state_dict(self) -> dict[str, Any]:
        return self.latent.state_dict() if self.latent is not None else {}

    def load_state_dict(self, state: dict[str, Any], handle: "Compression") -> None:
        if state:
            self._saved = state
