"""Lightning saves the training loader's state in checkpoints; a resumed fit sees exactly the remaining batches."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from mmclip.data.synthetic_module import SyntheticDataModule


class _Recorder(L.LightningModule):
    """Records what every training step sees; trains nothing."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[tuple[str, ...], float]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((tuple(batch.keys), float(batch.images.double().sum())))
        return self.weight * batch.images.mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(tok, max_steps: int = -1, ckpt_path: str | None = None, callbacks=()) -> list:
    dm = SyntheticDataModule(
        n_train=40, n_val=0, n_test=0, image_size=8, batch_size=4, num_workers=2, tokenizer=tok
    )
    model = _Recorder()
    trainer = L.Trainer(
        max_epochs=2,
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=bool(callbacks),
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_resumed_fit_sees_the_remaining_batches(tmp_path, clip_tokenizer):
    reference = _fit(clip_tokenizer)  # 2 epochs x 10 batches
    assert len(reference) == 20 and reference[:10] != reference[10:]
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=13, save_top_k=-1)
    interrupted = _fit(clip_tokenizer, max_steps=13, callbacks=[checkpoint])  # stops mid second epoch
    (path,) = list(tmp_path.glob("*.ckpt"))
    saved = torch.load(path, weights_only=False)
    state = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert state[0]["epoch"] == 1 and state[0]["consumed"] == 3
    assert saved["SyntheticDataModule"] == {"skip_stats": {"counts": {}, "n_ok": 52}}  # counted by the loader
    resumed = _fit(clip_tokenizer, ckpt_path=str(path))
    assert interrupted + resumed == reference
