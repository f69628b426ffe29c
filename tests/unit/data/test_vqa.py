"""The interleaved shapes questions: answers follow from the scenes, labels cover exactly the answers."""

from __future__ import annotations

import pytest
import torch

from mmclip.data.vqa import (
    CHUNK_TOKEN,
    MEDIA_TOKEN,
    QUESTION_TYPES,
    ShapesQA,
    ShapesQADataModule,
    encode_example,
)
from mmclip.towers.base import DataConfig


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from mmclip.data.vqa import qa_corpus
    from mmclip.tokenizers import train_bpe_tokenizer

    tok = train_bpe_tokenizer(qa_corpus(300), 512, tmp_path_factory.mktemp("tok")).tokenizer
    tok.add_special_tokens({"additional_special_tokens": [MEDIA_TOKEN, CHUNK_TOKEN]})
    return tok


def test_answers_follow_from_the_scenes():
    data = ShapesQA("test", 200, shots=(0, 2))
    counts = {}
    for i in range(200):
        ex = data.example(i)
        assert ex.qtype == QUESTION_TYPES[i % 4] and len(ex.scenes) in (1, 3)
        counts[len(ex.scenes)] = counts.get(len(ex.scenes), 0) + 1
        for scene, answer in zip(ex.scenes, ex.answers, strict=True):
            objects = scene.objects
            if ex.qtype == "count":
                assert answer == ("one", "two", "three")[len(objects) - 1]
                continue
            (o,) = objects  # colour, shape and position questions show one shape
            expected = {"colour": o.colour, "shape": o.shape, "position": None}[ex.qtype]
            if expected is not None:
                assert answer == expected
            else:
                assert " ".join(answer.split()) in o.place and "the" not in answer.split()
    assert set(counts) == {1, 3}
    assert data.example(7) == ShapesQA("test", 200, shots=(0, 2)).example(7)  # the same on every run
    assert data.example(7) != ShapesQA("train", 200, shots=(0, 2)).example(7)


def test_labels_cover_exactly_the_answers_and_their_chunk_ends(tokenizer):
    data = ShapesQA("train", 8, shots=(2,))
    ex = data.example(3)
    ids, labels = encode_example(tokenizer, ex)
    assert len(ids) == len(labels)
    taught = tokenizer.decode([t for t in labels if t != -100])
    pieces = taught.split(CHUNK_TOKEN)
    assert pieces[-1] == "" and [p.strip() for p in pieces[:-1]] == ex.answers
    assert ids.count(tokenizer.convert_tokens_to_ids(MEDIA_TOKEN)) == 3
    prompt_ids, _ = encode_example(tokenizer, ex, with_answer=False)
    assert tokenizer.decode(prompt_ids).replace(" ", "") == ex.prompt().replace(" ", "")


def test_the_data_module_pads_text_and_images(tokenizer):
    dm = ShapesQADataModule(n_train=8, batch_size=4, shots=(0, 2)).configure(
        data_config=DataConfig(image_size=(32, 32)), tokenizer=tokenizer
    )
    batch = next(iter(dm.train_dataloader()))
    B, L = batch["input_ids"].shape
    assert batch["images"].shape[:2] == (4, 3) and batch["images"].shape[-2:] == (32, 32)
    assert batch["labels"].shape == (B, L) and batch["attention_mask"].sum(1).max() == L
    assert ((batch["labels"] != -100) <= (batch["attention_mask"] == 1)).all()  # no label on padding
    single = [i for i in range(B) if (batch["input_ids"][i] == tokenizer.convert_tokens_to_ids(MEDIA_TOKEN)).sum() == 1]
    for i in single:  # a one-image example's missing images are zeros
        assert torch.equal(batch["images"][i, 1:], torch.zeros_like(batch["images"][i, 1:]))
