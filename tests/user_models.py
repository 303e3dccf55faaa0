"""Models written the way users write them, shared by the tests of every part that reads a user's model."""
import torch
from torch import nn
from torch.nn import functional as F


class KeywordSpotter(nn.Module):
    """A keyword spotter: 40 log-mel bands in, 12 keywords out, from the last frame."""

    def __init__(self, features: int = 40, hidden: int = 128, keywords: int = 12) -> None:
        super().__init__()
        self.rnn = nn.LSTM(features, hidden, 2, batch_first=True)
        self.fc = nn.Linear(hidden, keywords)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


class RNNModel(nn.Module):
    """PyTorch's examples/word_language_model RNNModel (LSTM branch), as published."""

    def __init__(self, ntoken: int = 50, ninp: int = 16, nhid: int = 24, nlayers: int = 2, dropout: float = 0.2):
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nhid, self.nlayers = nhid, nlayers

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output)
        decoded = decoded.view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        return (weight.new_zeros(self.nlayers, bsz, self.nhid), weight.new_zeros(self.nlayers, bsz, self.nhid))


class Tagger(nn.Module):
    """A bidirectional sequence tagger with a projected LSTM: a tag per input step."""

    def __init__(self, features: int = 10, hidden: int = 24, proj: int = 8, tags: int = 5) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, 2, batch_first=True, bidirectional=True, proj_size=proj)
        self.dropout = nn.Dropout(0.1)
        self.tags = nn.Linear(2 * proj, tags)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.tags(self.dropout(out))


# --- a user's training loop with a compression handle -------------------------------------------------------------
def random_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The data of optimiser step ``step`` for a (B, T, 6) -> 3-class model: the same whoever asks, interrupted
    or not."""
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(4, 5, 6, generator=generator), torch.randint(0, 3, (4,), generator=generator)


def train_steps(model, handle, optimizer, steps: int, start: int = 0, batch=random_batch) -> None:
    """Steps ``start..start+steps`` of the loop ``compress_``'s docs show: the handle's penalty in the loss,
    ``after_step()`` after each optimiser step."""
    for step in range(start, start + steps):
        x, y = batch(step)
        loss = F.cross_entropy(model(x), y) + handle.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        handle.after_step()
