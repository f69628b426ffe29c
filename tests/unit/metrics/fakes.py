"""Fixed towers, tokenizer and data module whose embeddings the tests choose, so answers are known.

- ``VectorImageTower``: the embedding is written into the pixels (first D values of the flattened image).
- ``VectorTextTower``: the embedding is the token ids minus ``OFFSET`` (ids stay non-negative).
- ``FakeTokenizer``: maps a prompt to the class it names (one-hot), optionally plus a per-template part.
- ``FakeDataModule``: implements the data-module contract (retrieval / classification loaders sharded
  by rank, ``classnames``, ``templates``, ``tokenizer``) over these vectors; shards are either padded like
  ``DistributedSampler`` (duplicates) or uneven contiguous blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmclip.data.batch import ImageTextBatch
from mmclip.models.dual_encoder import DualEncoder
from mmclip.outputs import TowerOutput
from mmclip.towers.base import DataConfig

OFFSET = 1000
IMAGE_SHAPE = (3, 4, 4)


class VectorImageTower(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.output_dim = dim
        self.data_config = DataConfig(image_size=IMAGE_SHAPE[1:])

    def forward(self, x: torch.Tensor) -> TowerOutput:
        return TowerOutput(pooled=x.flatten(1)[:, : self.output_dim])  # (B, D)


class VectorTextTower(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.output_dim = dim

    def forward(self, ids: torch.Tensor) -> TowerOutput:
        return TowerOutput(pooled=ids[:, : self.output_dim].float() - OFFSET)  # (B, D)


def fake_model(dim: int) -> DualEncoder:
    return DualEncoder(
        VectorImageTower(dim), VectorTextTower(dim), embed_dim=dim, image_proj="none", text_proj="none"
    )


def images_from(vectors: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B, 3, 4, 4) images whose first D pixels are the vectors."""
    images = torch.zeros(vectors.shape[0], *IMAGE_SHAPE)
    images.view(vectors.shape[0], -1)[:, : vectors.shape[1]] = vectors.float()
    return images


def ids_from(vectors: torch.Tensor) -> torch.Tensor:
    return vectors.long() + OFFSET  # (T, D)


class FakeTokenizer:
    """Prompt -> one-hot of the class it names (longest class name contained in it), as token ids.

    With ``template_weight`` > 0, coordinate ``num_classes + len(prompt) % 2`` gets
    ``template_weight * (1 + len(prompt) % 3)``, so templates give embeddings of different directions
    and norms (normalising before averaging then matters).
    """

    pad_token_id = 0
    eot_token_id = 1
    vocab_size = 2 * OFFSET

    def __init__(self, classnames: list[str], dim: int, template_weight: int = 0) -> None:
        self.classnames = list(classnames)
        self.dim = dim
        self.template_weight = template_weight
        self.context_length = dim

    def vector(self, text: str) -> torch.Tensor:
        hits = [(len(n), i) for i, n in enumerate(self.classnames) if n in text]
        v = torch.zeros(self.dim, dtype=torch.long)
        if hits:
            v[max(hits)[1]] = 2
        if self.template_weight:
            v[len(self.classnames) + len(text) % 2] = self.template_weight * (1 + len(text) % 3)
        return v

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else texts
        return ids_from(torch.stack([self.vector(t) for t in texts]))


@dataclass
class Split:
    vectors: torch.Tensor  # (N, D) image embeddings
    captions: list[torch.Tensor]  # per image (k_i, D) caption embeddings
    labels: torch.Tensor | None  # (N,)
    keys: list[str]


def make_split(
    n: int,
    dim: int,
    seed: int,
    num_classes: int = 4,
    max_captions: int = 3,
    prefix: str = "s",
    spread: int = 3,
) -> Split:
    """Integer vectors: class prototypes (the same for every seed) plus noise for images, image plus
    noise for captions."""
    protos = (
        torch.randint(-spread, spread + 1, (num_classes, dim), generator=torch.Generator().manual_seed(99))
        * 2
    )
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    vectors = protos[labels] + torch.randint(-2, 3, (n, dim), generator=g)
    captions = []
    for i in range(n):
        k = int(torch.randint(1, max_captions + 1, (1,), generator=g))
        captions.append(vectors[i] + torch.randint(-2, 3, (k, dim), generator=g))
    return Split(vectors, captions, labels, [f"{prefix}-{i:05d}" for i in range(n)])


def shard_indices(n: int, rank: int, world_size: int, pad: bool) -> list[int]:
    """DistributedSampler-style padded interleave (pad=True) or uneven contiguous blocks (pad=False)."""
    if pad:
        idx = list(range(n))
        total = -(-n // world_size) * world_size
        idx += idx[: total - n]
        return idx[rank::world_size]
    weights = [r + 1 for r in range(world_size)]  # rank r holds a share proportional to r + 1
    bounds = [round(n * sum(weights[:r]) / sum(weights)) for r in range(world_size + 1)]
    return list(range(bounds[rank], bounds[rank + 1]))


class FakeDataModule:
    """The evaluation side of the data-module contract over :class:`Split` data (no Lightning import, so
    spawned test processes start faster; the callback tests mix in ``LightningDataModule``)."""

    def __init__(
        self,
        splits: dict[str, Split],
        classnames: list[str] | None,
        tokenizer: FakeTokenizer,
        templates: list[str] | None = None,
        batch_size: int = 4,
        pad: bool = True,
    ) -> None:
        super().__init__()
        self.splits = splits
        self.classnames = classnames
        self.templates = templates
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.pad = pad
        self.configured: dict = {}

    def configure(self, data_config=None, tokenizer=None) -> None:
        self.configured = {"data_config": data_config, "tokenizer": tokenizer}

    def _batches(self, split: str, rank: int, world_size: int, with_labels: bool) -> list[ImageTextBatch]:
        s = self.splits[split]
        idx = shard_indices(len(s.keys), rank, world_size, self.pad)
        out = []
        for start in range(0, len(idx), self.batch_size):
            rows = idx[start : start + self.batch_size]
            caps = [s.captions[i] for i in rows]
            out.append(
                ImageTextBatch(
                    images=images_from(s.vectors[rows]),
                    input_ids=ids_from(torch.cat(caps)),
                    keys=[s.keys[i] for i in rows],
                    caption_image_index=torch.cat(
                        [torch.full((c.shape[0],), j, dtype=torch.long) for j, c in enumerate(caps)]
                    ),
                    labels=s.labels[rows] if with_labels and s.labels is not None else None,
                )
            )
        return out

    def retrieval_dataloader(self, split: str = "val", rank: int = 0, world_size: int = 1):
        return self._batches(split, rank, world_size, with_labels=False)

    def classification_dataloader(self, split: str = "test", rank: int = 0, world_size: int = 1):
        if split not in self.splits or self.splits[split].labels is None:
            return None
        return self._batches(split, rank, world_size, with_labels=True)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(8, 1)), batch_size=2)


def standard_datamodule(
    dim: int = 8, pad: bool = True, batch_size: int = 4, cls: type = FakeDataModule
) -> FakeDataModule:
    classnames = ["cat", "dog", "bird", "fish"]
    splits = {
        "val": make_split(23, dim, seed=1, prefix="val"),
        "test": make_split(21, dim, seed=2, prefix="test"),
        "train": make_split(40, dim, seed=3, prefix="train"),
    }
    return cls(
        splits,
        classnames,
        FakeTokenizer(classnames, dim),
        templates=["a photo of a {}.", "a {}"],
        batch_size=batch_size,
        pad=pad,
    )
