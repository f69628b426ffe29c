"""VLMTask: trains the bridge of a :class:`~mmclip.models.vlm.VisionLanguageModel` (resampler, gated blocks, the
two new token embeddings) between a frozen image tower and a frozen causal language model.

Every argument is plain data. The frozen parts are not saved in checkpoints, only their fingerprints, so a
checkpoint is reloaded from the same sources: ``image_encoder`` (a model source, e.g. the demo's
``runs/shapes_tiny/checkpoints/last.ckpt``) and ``lm`` (a ``transformers`` directory or hub id). For the synthetic
data, ``lm_init`` builds that directory the first time: a small GPT-2 and a BPE tokenizer trained on the
questions' text, so that the frozen model knows the language (as Flamingo's LM does) but not the images.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmclip.models.vlm import VisionLanguageModel
from mmclip.tasks.base import TrainingTask

__all__ = ["VLMTask", "build_text_lm"]

log = logging.getLogger(__name__)

_LM_INIT_KEYS = {"config", "steps", "lr", "batch_size", "vocab_size", "num_examples", "seed"}


def build_text_lm(out_dir: str | Path, config: dict[str, Any] | None = None, steps: int = 300, lr: float = 3e-3,
                  batch_size: int = 64, vocab_size: int = 512, num_examples: int = 4000, seed: int = 0) -> Path:
    """A small GPT-2 and its BPE tokenizer trained on the text of the shapes questions (no image), saved to
    ``out_dir`` with ``save_pretrained``; the frozen language model of ``experiment=vlm_shapes``.

    Deterministic for given arguments on a given machine. Returns ``out_dir``.
    """
    import tempfile

    from transformers import GPT2Config, GPT2LMHeadModel

    from mmclip.data.vqa import qa_corpus
    from mmclip.tokenizers import train_bpe_tokenizer

    out = Path(out_dir)
    corpus = qa_corpus(num_examples, seed=seed)
    with tempfile.TemporaryDirectory(prefix="mmclip-lm-tok-") as tmp:
        tok = train_bpe_tokenizer(corpus, vocab_size, tmp).tokenizer
    tok.model_max_length = 1024
    torch.manual_seed(seed)
    cfg = {"n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 256, **(config or {})}
    cfg.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    lm = GPT2LMHeadModel(GPT2Config(**cfg))
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    lm.train()
    for step in range(steps):
        rows = [corpus[i] + tok.eos_token for i in torch.randint(len(corpus), (batch_size,), generator=g).tolist()]
        enc = tok(rows, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = lm(**enc, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("language model on the questions' text: step %d/%d, loss %.3f", step + 1, steps, float(loss.detach()))
    lm.eval()
    out.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(out)
    tok.save_pretrained(out)
    return out


class VLMTask(TrainingTask):
    """Trains a Flamingo-style bridge on interleaved image-text data (``ShapesQADataModule``'s batches).

    Args:
        image_encoder: any model source with an image tower (its weights included: a ``.ckpt``, a model
            directory, a hub id), or a named model (random weights, seeded by ``tower_seed``).
        lm: a ``transformers`` causal LM directory or hub id (with its tokenizer).
        lm_init: when ``lm`` is a directory that does not exist yet, build it with :func:`build_text_lm`
            (``config``, ``steps``, ``lr``, ``batch_size``, ``vocab_size``, ``num_examples``, ``seed``).
        cross_attn_every: a gated block before every N-th decoder block.
        resampler: ``PerceiverResampler`` settings.
        cross_attn: ``GatedCrossAttentionBlock`` settings.
        image_layer: read the tokens of this image tower block (e.g. -2) instead of its final tokens.
        gate_lr_scale: learning-rate multiplier of the tanh gates (they start at 0; a larger step opens them
            sooner on small runs).
        optimizer: optimizer spec (``build_optimizer``); scheduler: schedule spec.
        evaluation: ``{"n_test", "shots", "max_new_tokens"}`` for :meth:`report`.
        thresholds: ``{metric: minimum}`` checks of the report (e.g. ``{"exact/colour/0shot": 0.9}``).
        tower_seed: seed of a random-init image tower (named models only).
    """

    def __init__(
        self,
        image_encoder: str | dict[str, Any] = "tiny-vit",
        lm: str = "gpt2",
        lm_init: dict[str, Any] | None = None,
        cross_attn_every: int = 1,
        resampler: dict[str, Any] | None = None,
        cross_attn: dict[str, Any] | None = None,
        image_layer: int | None = None,
        gate_lr_scale: float = 1.0,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        evaluation: dict[str, Any] | None = None,
        thresholds: dict[str, float] | None = None,
        tower_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mmclip.models.factory import create_model

        if lm_init is not None and not Path(lm).exists():
            unknown = set(lm_init) - _LM_INIT_KEYS
            if unknown:
                raise ValueError(f"unknown lm_init keys {sorted(unknown)}; known: {sorted(_LM_INIT_KEYS)}")
            log.info("building the frozen language model in %s (lm_init)", lm)
            build_text_lm(lm, **lm_init)
        if isinstance(image_encoder, str) and image_encoder.endswith(".ckpt") and not Path(image_encoder).exists():
            raise FileNotFoundError(
                f"image_encoder {image_encoder!r} does not exist: train the image tower first (`make demo` writes "
                "runs/shapes_tiny/checkpoints/last.ckpt) or set task.image_encoder to another model source"
            )
        with torch.random.fork_rng():
            torch.manual_seed(tower_seed)
            source = create_model(image_encoder)
        tokenizer = AutoTokenizer.from_pretrained(lm)
        language_model = AutoModelForCausalLM.from_pretrained(lm)
        self.model = VisionLanguageModel(
            source, language_model, tokenizer, cross_attn_every, resampler, cross_attn, image_layer
        )
        self.optimizer_spec = dict(optimizer or {})
        if gate_lr_scale != 1.0:
            self.optimizer_spec["lr_scale"] = {"_gate": float(gate_lr_scale), **self.optimizer_spec.get("lr_scale", {})}
        self.scheduler_spec = dict(scheduler or {})

    @property
    def data_config(self) -> Any:
        return self.model.featurizer.data_config

    @property
    def tokenizer(self) -> Any:
        """The language model's tokenizer, with the image and end-of-chunk tokens."""
        return self.model.tokenizer

    # ---- training ----------------------------------------------------------------------------------
    def loss_of(self, batch: dict[str, Any]) -> torch.Tensor:
        """Next-token cross-entropy on the answers and their end-of-chunk tokens."""
        logits = self.model(batch["input_ids"], batch["images"], batch["attention_mask"])  # (B, L, V)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss_of(batch)
        n = len(batch["input_ids"])
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=n)
        gate = torch.stack([b.attn_gate.detach().tanh().abs() for b in self.model.cross_attn]).mean()
        self.log("train/attn_gate", gate, batch_size=n)
        self.log_lr(n)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        rate = self._throughput.update(len(batch["input_ids"]) * self.trainer.world_size)
        if rate is not None:
            self.log("train/samples_per_sec", rate, rank_zero_only=True)

    def on_fit_end(self) -> None:
        self.model.verify_unchanged()  # the frozen tower and language model, bit for bit

    # ---- evaluation --------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, datamodule: Any, n_test: int = 400, shots: tuple[int, ...] = (0, 2),
                 max_new_tokens: int = 6, batch_size: int = 50) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Exact-match accuracy per question type and number of solved examples on held-out images."""
        from mmclip.data.vqa import QUESTION_TYPES

        self.model.eval()
        metrics: dict[str, float] = {}
        samples: list[dict[str, Any]] = []
        for k in shots:
            data = datamodule.dataset("test", n_test, shots=(k,))
            right: Counter[str] = Counter()
            total: Counter[str] = Counter()
            for start in range(0, n_test, batch_size):
                examples = [data.example(i) for i in range(start, min(n_test, start + batch_size))]
                images = torch.stack([data.images(e) for e in examples]).to(self.device)
                answers = self.model.answer([e.prompt() for e in examples], images, max_new_tokens)
                for e, a in zip(examples, answers, strict=True):
                    total[e.qtype] += 1
                    right[e.qtype] += a == e.answers[-1]
                    if len(samples) < 40:
                        samples.append({"shots": k, "type": e.qtype, "prompt": e.prompt(), "answer": a,
                                        "expected": e.answers[-1]})
            for q in QUESTION_TYPES:
                metrics[f"exact/{q}/{k}shot"] = right[q] / max(1, total[q])
            metrics[f"exact/all/{k}shot"] = sum(right.values()) / max(1, sum(total.values()))
        return metrics, samples

    def report(self, datamodule: Any, out_dir: str | Path) -> dict[str, Any]:
        """Answers held-out questions zero-shot and with solved examples; writes ``metrics.json`` and
        ``samples.jsonl``. Returns ``{"metrics", "checks", "passed", "dir"}``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        spec = dict(self.hparams.evaluation or {})
        if "shots" in spec:
            spec["shots"] = tuple(spec["shots"])
        metrics, samples = self.evaluate(datamodule, **spec)
        thresholds = dict(self.hparams.thresholds or {})
        checks = {k: (metrics.get(k), v, metrics.get(k, -math.inf) >= v) for k, v in thresholds.items()}
        passed = all(ok for _, _, ok in checks.values())
        (out / "metrics.json").write_text(json.dumps({"metrics": metrics, "thresholds": thresholds,
                                                      "passed": passed}, indent=2))
        with (out / "samples.jsonl").open("w") as f:
            for s in samples:
                f.write(json.dumps(s) + "\n")
        lines = ["# Vision-language report", "", "Exact match of the answer on held-out images.", "",
                 "| question | " + " | ".join(f"{k} solved" for k in spec.get("shots", (0, 2))) + " |",
                 "|---|" + "---|" * len(spec.get("shots", (0, 2)))]
        for q in ("colour", "shape", "count", "position", "all"):
            row = [metrics.get(f"exact/{q}/{k}shot") for k in spec.get("shots", (0, 2))]
            lines.append(f"| {q} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in row) + " |")
        lines += [""] + [f"- {'pass' if ok else 'FAIL'} {k} = {'missing' if v is None else f'{v:.3f}'} (target >= {t})"
                         for k, (v, t, ok) in checks.items()]
        (out / "summary.md").write_text("\n".join(lines) + "\n")
        return {"metrics": metrics, "checks": checks, "passed": passed, "dir": str(out)}
