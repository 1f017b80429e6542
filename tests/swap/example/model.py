"""The user's model: a two-layer MLP that saves and loads like any hub model."""

import torch
from huggingface_hub import PyTorchModelHubMixin


class BlobMLP(torch.nn.Module, PyTorchModelHubMixin):
    def __init__(self, features: int = 16, hidden: int = 64, classes: int = 4, dropout: float = 0.1):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.ReLU(), torch.nn.Dropout(dropout),
                                       torch.nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
