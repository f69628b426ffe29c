"""SigLIP 2 NaFlex against transformers: a random ``Siglip2Model`` directory with its ``Siglip2ImageProcessor``
loads into mmclip's ``naflex_vit`` and gives the same embeddings (fp32, <= 1e-5) on PIL images of several aspect
ratios; the preprocessing alone is pixel-exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import mmclip
from mmclip.data.naflex import NaFlexImages, NaFlexSample, collate_images, naflex_size

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Siglip2Model"):
    pytest.skip("this transformers has no Siglip2Model", allow_module_level=True)

PATCH, BUDGET = 8, 24
# square, 3:1 wide, 1:3 tall, odd sizes, tiny, huge aspect ratio
SIZES = [(64, 64), (40, 120), (120, 40), (37, 91), (5, 7), (16, 400)]


@pytest.fixture(scope="module")
def siglip2_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    torch.manual_seed(0)
    config = transformers.Siglip2Config(
        vision_config={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "intermediate_size": 128, "patch_size": PATCH, "num_patches": 16},
        text_config={"vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "intermediate_size": 128, "max_position_embeddings": 16,
                     "bos_token_id": None, "eos_token_id": 1, "pad_token_id": 1},
    )
    hf = transformers.Siglip2Model(config).eval()
    with torch.no_grad():  # every tensor away from its init (norm gains, biases, the probe)
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    root = tmp_path_factory.mktemp("siglip2")
    hf.save_pretrained(root)
    transformers.Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=BUDGET).save_pretrained(root)
    return root, hf


def _images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


def test_preprocessing_is_pixel_exact_with_siglip2_image_processor(siglip2_dir):
    root, _ = siglip2_dir
    processor = transformers.Siglip2ImageProcessor.from_pretrained(root)
    _, _, preprocess = mmclip.create_model_and_transforms(str(root))
    images = _images()
    reference = processor(images=images, return_tensors="pt")
    batch = collate_images([preprocess(im) for im in images], pad_to=BUDGET)
    assert torch.equal(batch.grid, reference["spatial_shapes"].long())
    assert torch.equal(batch.mask, reference["pixel_attention_mask"].bool())
    assert torch.equal(batch.patches, reference["pixel_values"])  # bit for bit, padding included


def test_image_and_text_embeddings_match_transformers(siglip2_dir):
    root, hf = siglip2_dir
    processor = transformers.Siglip2ImageProcessor.from_pretrained(root)
    model, _, preprocess = mmclip.create_model_and_transforms(str(root))
    model.eval()
    assert type(model.image_tower).__name__ == "NaFlexVisionTransformer"
    images = _images(1)
    with torch.no_grad():
        reference = hf.get_image_features(**processor(images=images, return_tensors="pt"))
        reference = getattr(reference, "pooler_output", reference)
        ours = model.encode_image(collate_images([preprocess(im) for im in images]), normalize=True)
        torch.testing.assert_close(ours, F.normalize(reference, dim=-1), atol=1e-5, rtol=0)
        ids = torch.randint(2, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
        ids[1, 9:] = 1  # padded with the pad id, as the Gemma tokenizer pads
        reference = hf.get_text_features(input_ids=ids)
        reference = getattr(reference, "pooler_output", reference)
        torch.testing.assert_close(model.encode_text(ids, normalize=True), F.normalize(reference, dim=-1),
                                   atol=1e-5, rtol=0)


def test_padding_and_batch_company_do_not_change_an_embedding(siglip2_dir):
    """Masks keep padding out of attention and pooling: an image alone equals itself padded in any batch."""
    root, _ = siglip2_dir
    model, _, preprocess = mmclip.create_model_and_transforms(str(root))
    model.eval()
    samples = [preprocess(im) for im in _images(2)]
    with torch.no_grad():
        together = model.encode_image(collate_images(samples, pad_to=40))
        for i, s in enumerate(samples):
            alone = model.encode_image(collate_images([s]))
            torch.testing.assert_close(alone[0], together[i], atol=1e-5, rtol=1e-5)


def test_square_tensors_are_full_patch_grids(siglip2_dir):
    """Plain (B, C, H, W) batches (the training and evaluation roads) are full grids of patches: equal to
    transformers' vision model fed its own patchification of them with an all-ones mask."""
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

    root, hf = siglip2_dir
    model = mmclip.create_model(str(root)).eval()
    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    patches = torch.stack([convert_image_to_patches(im, PATCH) for im in images])
    with torch.no_grad():
        reference = hf.get_image_features(
            pixel_values=patches, pixel_attention_mask=torch.ones(2, 24, dtype=torch.long),
            spatial_shapes=torch.tensor([[4, 6], [4, 6]]),
        )
        reference = getattr(reference, "pooler_output", reference)
        torch.testing.assert_close(model.encode_image(images, normalize=True), F.normalize(reference, dim=-1),
                                   atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="multiples of 8"):
        model.encode_image(torch.randn(1, 3, 30, 32))
    with pytest.raises(TypeError, match="not NaFlexImages"):  # a NaFlex batch into a fixed-size tower
        mmclip.create_model("tiny-vit").encode_image(collate_images([NaFlexSample(torch.zeros(4, 192), (2, 2))]))


@pytest.mark.parametrize("h, w", SIZES + [(1, 1), (1000, 3), (3, 1000), (513, 257)])
@pytest.mark.parametrize("budget", [1, 4, 24, 256])
def test_naflex_size_keeps_the_budget_and_matches_the_reference(h, w, budget):
    from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches

    size = naflex_size(h, w, PATCH, budget)
    assert size == get_image_size_for_max_num_patches(h, w, PATCH, budget)
    assert size[0] % PATCH == 0 and size[1] % PATCH == 0
    assert (size[0] // PATCH) * (size[1] // PATCH) <= max(budget, 1)


def test_collate_images_stacks_tensors_and_says_what_is_wrong():
    stacked = collate_images([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    assert stacked.shape == (2, 3, 8, 8)
    sample = NaFlexSample(torch.zeros(4, 12), (2, 2))
    batch = collate_images([sample, NaFlexSample(torch.ones(6, 12), (2, 3))])
    assert isinstance(batch, NaFlexImages) and batch.patches.shape == (2, 6, 12)
    assert batch.mask.sum(1).tolist() == [4, 6] and batch.grid.tolist() == [[2, 2], [2, 3]]
    with pytest.raises(ValueError, match="not a mix"):
        collate_images([sample, torch.zeros(3, 8, 8)])
    with pytest.raises(ValueError, match="below the longest"):
        collate_images([sample], pad_to=2)
    with pytest.raises(ValueError, match="at least one"):
        collate_images([])
    # a batch of NaFlex images slices like a tensor batch (micro-batches, ImageTextBatch's length)
    from mmclip.data.batch import ImageTextBatch

    assert batch[1].grid.tolist() == [[2, 3]] and len(batch[0:2]) == 2 and len(batch[torch.tensor([1])]) == 1
    texts = ImageTextBatch(batch, torch.zeros(2, 4, dtype=torch.long), ["a", "b"])
    assert len(texts) == 2 and texts.text_to_image.tolist() == [0, 1]


def test_a_naflex_model_trains_through_the_task():
    """The training road: ContrastiveTask with a NaFlex SigLIP on square batches, loss falling."""
    import lightning.pytorch as pl

    from mmclip.tasks import ContrastiveTask
    from tests.unit.tasks.fakes import FakeDataModule

    spec = {
        "image_tower": {"name": "naflex_vit", "patch_size": 8, "width": 64, "layers": 2, "heads": 2,
                        "pos_grid": 4, "max_num_patches": 16},
        "text_tower": {"name": "clip_text", "width": 64, "layers": 2, "heads": 2, "causal": False, "pool": "last"},
        "embed_dim": 64, "image_proj": "none", "text_proj_bias": True,
    }
    torch.manual_seed(0)
    task = ContrastiveTask(spec, loss={"name": "siglip"}, optimizer={"lr": 1e-3}, scheduler={"name": None})
    losses = []
    task.log = lambda name, value, **kw: losses.append(float(value)) if name == "train/loss" else None
    pl.Trainer(accelerator="cpu", max_steps=12, logger=False, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False).fit(task, datamodule=FakeDataModule(n=8))
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
