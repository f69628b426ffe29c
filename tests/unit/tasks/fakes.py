"""A tiny in-memory data module honouring the data-module contract, for task tests."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from mmclip.data.batch import ImageTextBatch


class _Pairs(Dataset):
    def __init__(self, n: int, image_size: int, length: int, vocab: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, image_size, image_size, generator=g)
        self.ids = torch.randint(1, vocab - 1, (n, length), generator=g)
        self.ids[:, -1] = vocab - 1  # end-of-text token (the highest id) pools the clip text tower

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        return self.images[i], self.ids[i], f"s{i}"


def _collate(items: list) -> ImageTextBatch:
    images, ids, keys = zip(*items, strict=True)
    return ImageTextBatch(torch.stack(images), torch.stack(ids), list(keys))


class FakeDataModule(pl.LightningDataModule):
    def __init__(
        self, n: int = 32, batch_size: int = 8, image_size: int = 32, vocab: int = 49408, seed: int = 0
    ):
        super().__init__()
        self.data = _Pairs(n, image_size, 6, vocab, seed)
        self.batch_size = batch_size
        self.skip_stats = None
        self.tokenizer = None

    def configure(self, data_config=None, tokenizer=None) -> None:
        self.tokenizer = tokenizer

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=False, collate_fn=_collate)
