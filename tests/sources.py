"""Every kind of model source, built tiny and offline, each with its reference implementation.

A ``Source`` holds what a user would pass (``source``, ``pretrained``), the peer model that defines the right
embeddings (transformers, open_clip, or the original mmclip model), and how that peer embeds images and
tokenizes text. Hub sources are laid out in a local hub cache (``HF_HUB_CACHE``) and read offline.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import mmclip
from tests.conftest import randomize_

CAPTIONS = ["a photo of a cat", "a small red circle to the left of a blue square", "x " * 100]
HUB_CLIP = "openai/clip-vit-base-patch32"  # a real repo id, laid out in the test's own cache
HUB_OPENCLIP = "timm/tiny-openclip-test"
_COMMIT = "0123456789abcdef0123456789abcdef01234567"
# The same tiny ViT-B/32-shaped CLIP in three vocabularies: open_clip's config, mmclip's named tiny-vit.
OPENCLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
PREPROCESS = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}


@dataclass
class Source:
    """A model source and its reference."""

    kind: str
    source: Any
    pretrained: Any
    embed_image: Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) -> (B, D) normalised
    embed_text: Callable[[list[str]], torch.Tensor]  # captions -> (T, D) normalised, reference tokenizer
    reference_ids: Callable[[list[str]], torch.Tensor] | None = None


def _norm(x: Any) -> torch.Tensor:
    x = x.pooler_output if hasattr(x, "pooler_output") else x
    return torch.nn.functional.normalize(x, dim=-1)


def lay_out_hub(cache: Path, repo: str, files: Path) -> None:
    """Puts ``files`` into a hub cache as the main revision of ``repo`` (what a download would leave)."""
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(_COMMIT)
    shutil.copytree(files, base / "snapshots" / _COMMIT, dirs_exist_ok=True)


def hf_clip_dir(root: Path) -> tuple[Path, Any]:
    """A tiny transformers CLIPModel with CLIP tokenizer and preprocessing files, and the model."""
    import transformers

    common = {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 2, "num_hidden_layers": 2}
    text = {**common, "vocab_size": 49408, "max_position_embeddings": 77, "eos_token_id": 49407}
    vision = {**common, "image_size": 32, "patch_size": 8}
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    hf = randomize_(transformers.CLIPModel(config), seed=3).eval()
    hf.save_pretrained(str(root))
    mmclip.ClipTokenizer(context_length=77).save_hf(root)
    (root / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": PREPROCESS["mean"], "image_std": PREPROCESS["std"], "crop_size": 32, "size": 32})
    )
    return root, hf


def openclip_dir(root: Path) -> tuple[Path, Any]:
    """A tiny open_clip CLIP saved as an OpenCLIP hub repo folder, and the model."""
    import open_clip

    model = randomize_(open_clip.model.CLIP(**OPENCLIP_CFG), seed=5).eval()
    root.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": OPENCLIP_CFG, "preprocess_cfg": PREPROCESS}
    (root / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "open_clip_model.safetensors"))
    return root, model


def build_sources(root: Path) -> dict[str, Source]:
    """One source of each kind under ``root``; the hub ones in ``root / 'hub'`` (set HF_HUB_CACHE to it)."""
    import open_clip
    import transformers

    sources: dict[str, Source] = {}
    hf_dir, hf = hf_clip_dir(root / "hf_clip")
    hf_tok = transformers.CLIPTokenizer.from_pretrained(str(hf_dir))

    def hf_ids(texts: list[str]) -> torch.Tensor:
        return hf_tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    hf_image = lambda x: _norm(hf.get_image_features(pixel_values=x))  # noqa: E731
    hf_text = lambda t: _norm(hf.get_text_features(input_ids=hf_ids(t)))  # noqa: E731
    sources["hf_dir"] = Source("hf_dir", str(hf_dir), None, hf_image, hf_text, hf_ids)
    lay_out_hub(root / "hub", HUB_CLIP, hf_dir)
    sources["hub_id"] = Source("hub_id", HUB_CLIP, None, hf_image, hf_text, hf_ids)

    oc_dir, oc = openclip_dir(root / "openclip")
    oc_image = lambda x: _norm(oc.encode_image(x))  # noqa: E731
    oc_text = lambda t: _norm(oc.encode_text(open_clip.tokenize(t)))  # noqa: E731
    sources["openclip_dir"] = Source("openclip_dir", str(oc_dir), None, oc_image, oc_text, open_clip.tokenize)
    lay_out_hub(root / "hub", HUB_OPENCLIP, oc_dir)
    sources["hf_hub_openclip"] = Source(
        "hf_hub_openclip", f"hf-hub:{HUB_OPENCLIP}", None, oc_image, oc_text, open_clip.tokenize
    )
    weights = root / "openclip_weights.bin"
    torch.save(oc.state_dict(), weights)
    sources["named_and_file"] = Source("named_and_file", "tiny-vit", str(weights), oc_image, oc_text, open_clip.tokenize)

    torch.manual_seed(11)
    own = randomize_(mmclip.create_model("tiny-vit"), seed=9).eval()
    own.save_pretrained(root / "mmclip_dir")
    tok = mmclip.get_tokenizer("clip")
    own_image = lambda x: own.encode_image(x, normalize=True)  # noqa: E731
    own_text = lambda t: own.encode_text(tok(t), normalize=True)  # noqa: E731
    sources["mmclip_dir"] = Source("mmclip_dir", str(root / "mmclip_dir"), None, own_image, own_text, tok)
    sources["spec_and_file"] = Source(
        "spec_and_file", own.config, str(root / "mmclip_dir" / "model.safetensors"), own_image, own_text, tok
    )
    sources["instance"] = Source("instance", own, None, own_image, own_text, tok)
    sources["checkpoint"] = Source("checkpoint", str(_task_checkpoint(root, own)), None, own_image, own_text, tok)
    return sources


def _task_checkpoint(root: Path, model: mmclip.DualEncoder) -> Path:
    """A ContrastiveTask training checkpoint whose model equals ``model`` (a fit of 0 learning rate)."""
    import lightning.pytorch as pl

    from mmclip.tasks import ContrastiveTask
    from tests.unit.tasks.fakes import FakeDataModule

    task = ContrastiveTask(model=str(root / "mmclip_dir"), optimizer={"lr": 0.0, "weight_decay": 0.0})
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, datamodule=FakeDataModule(n=8, batch_size=8))
    path = root / "task.ckpt"
    trainer.save_checkpoint(path)
    return path
