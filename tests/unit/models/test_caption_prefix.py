"""PrefixCaptioner (ClipCap): prefix shapes, the caption loss mask, freezing and generation.

References: the loss is recomputed from the LM's logits over hand-listed positions with
F.cross_entropy; greedy decoding is checked against a plain loop over the LM with inputs_embeds
(no KV cache, no transformers.generate). Everything runs offline with a word-level tokenizer built here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmclip.models.caption_prefix import (
    IGNORE_INDEX,
    CaptionTokenizer,
    MLPMapper,
    PrefixCaptioner,
    build_caption_labels,
    build_caption_targets,
)
from mmclip.models.factory import create_model

# "!" is id 0, as in GPT-2: it is a real token and must be trained.
WORDS = "! a the red green blue yellow circle square triangle star and small".split()
EOS = "<|endoftext|>"
LM = {
    "n_layer": 2,
    "n_embd": 64,
    "n_head": 2,
    "n_positions": 64,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}


def make_tokenizer(pad_is_eos: bool = True):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    for special in ("<unk>", EOS, *(() if pad_is_eos else ("<pad>",))):
        vocab[special] = len(vocab)
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=EOS, unk_token="<unk>", pad_token=EOS if pad_is_eos else "<pad>"
    )


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(pad_is_eos=True)


def make_model(tok, seed: int = 0, **kwargs) -> PrefixCaptioner:
    torch.manual_seed(seed)
    kwargs.setdefault("prefix_length", 4)
    kwargs.setdefault("image_encoder", create_model("tiny-vit"))
    return PrefixCaptioner(lm=dict(LM), tokenizer=tok, **kwargs)


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ---- targets and labels ------------------------------------------------------------------------
def test_build_caption_targets_appends_eos_and_masks_padding(tok):
    eos = tok.eos_token_id
    ids, mask = build_caption_targets(tok, ["a red circle !", "the star", "! a"], max_length=10)
    assert ids.tolist() == [[1, 3, 7, 0, eos], [2, 10, eos, eos, eos], [0, 1, eos, eos, eos]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    # pad == eos: only the mask tells the trained eos from padding
    assert ids[1, 2] == ids[1, 3] == eos and mask[1, 2] == 1 and mask[1, 3] == 0
    # truncation keeps max_length tokens and drops the eos; fixed-length padding
    ids, mask = build_caption_targets(tok, ["a red circle !", "a"], max_length=3, pad_to_max_length=True)
    assert ids.tolist() == [[1, 3, 7], [1, eos, eos]] and mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def test_build_caption_targets_separate_pad():
    tok = make_tokenizer(pad_is_eos=False)
    pad, eos = tok.pad_token_id, tok.eos_token_id
    assert pad != eos
    ids, mask = build_caption_targets(tok, ["a", "red circle"], max_length=8)
    assert ids.tolist() == [[1, eos, pad], [3, 7, eos]] and mask.tolist() == [[1, 1, 0], [1, 1, 1]]


def test_build_caption_labels():
    ids = torch.tensor([[0, 5, 9], [4, 9, 9]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    labels = build_caption_labels(ids, mask, prefix_length=2)
    x = IGNORE_INDEX
    assert labels.tolist() == [[x, x, 0, 5, 9], [x, x, 4, 9, x]]


def test_caption_tokenizer_duck_typed():
    class Plain:
        eot_token_id = 7

        def encode(self, text):
            return [len(w) for w in text.split()]

        def decode(self, ids):
            return " ".join(map(str, ids))

    tok = CaptionTokenizer(Plain())
    assert (tok.eos_token_id, tok.pad_token_id) == (7, 7)
    ids, mask = build_caption_targets(tok, ["ab abc", "a"], max_length=5)
    assert ids.tolist() == [[2, 3, 7], [1, 7, 7]] and mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    with pytest.raises(ValueError, match="eos"):
        CaptionTokenizer(lambda text: [1, 2])


# ---- prefix ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mapper, features, extra",
    [
        ("mlp", "pooled", {}),
        ("transformer", "pooled", {"mapper_layers": 2, "mapper_heads": 4}),
        ("transformer", "pooled", {"mapper_layers": 1, "clip_length": 3}),
        ("transformer", "tokens", {"mapper_layers": 1}),
    ],
)
def test_prefix_shapes(tok, mapper, features, extra):
    model = make_model(tok, mapper=mapper, features=features, prefix_length=5, **extra)
    prefix = model.encode_prefix(images(3))
    assert prefix.shape == (3, 5, 64)
    expected_in = 32 if features == "pooled" else 64  # tiny-vit: embed 32, width 64
    assert model.image_encoder.out_dim == expected_in


def test_mlp_mapper_is_clipcap_layout():
    mapper = MLPMapper(in_dim=32, lm_dim=64, prefix_length=10)
    layers = list(mapper.net)
    assert [type(m).__name__ for m in layers] == ["Linear", "Tanh", "Linear"]
    assert (layers[0].in_features, layers[0].out_features, layers[2].out_features) == (32, 320, 640)


def test_dual_encoder_features_are_projected_image_embeddings(tok):
    dual = create_model("tiny-vit")
    model = make_model(tok, image_encoder=dual)
    x = images(2)
    # the captioner keeps the DualEncoder's image tower + projection only (no text tower)
    assert {n for n, _ in model.image_encoder.named_children()} == {"tower", "proj"}
    assert not any(n.startswith("image_encoder.text") for n, _ in model.named_parameters())
    torch.testing.assert_close(model.encode_features(x), dual.eval().encode_image(x))


def test_tower_spec_and_unknown_options(tok):
    model = make_model(
        tok,
        image_encoder={
            "name": "clip_vit",
            "image_size": 32,
            "patch_size": 8,
            "width": 64,
            "layers": 1,
            "heads": 2,
        },
    )
    assert model.encode_prefix(images(2)).shape == (2, 4, 64)
    with pytest.raises(ValueError, match="transformer"):
        make_model(tok, mapper="mlp", features="tokens")
    with pytest.raises(ValueError, match="unknown mapper"):
        make_model(tok, mapper="lstm")


# ---- loss --------------------------------------------------------------------------------------
def test_precomputed_features_give_the_same_output(tok):
    model = make_model(tok)
    x = images(2)
    ids, mask = build_caption_targets(tok, ["a red circle", "the star"], 8)
    from_images = model(x, ids, mask)
    from_features = model(None, ids, mask, features=model.encode_features(x))
    torch.testing.assert_close(from_features.loss, from_images.loss, rtol=0, atol=0)
    assert model.generate_ids(features=model.encode_features(x), max_new_tokens=4) == model.generate_ids(
        x, max_new_tokens=4
    )


def _manual_loss(model, x, ids, n_real):
    """Loss from the LM's own logits over hand-listed (position, target) pairs."""
    k = model.prefix_length
    embeds = torch.cat([model.encode_prefix(x), model.lm.get_input_embeddings()(ids)], dim=1)
    logits = model.lm(inputs_embeds=embeds).logits  # (B, k + L, V); no mask: padding is at the end
    rows, targets = [], []
    for b, n in enumerate(n_real):
        for j in range(n):  # caption token j (eos included) is predicted at position k - 1 + j
            rows.append(logits[b, k - 1 + j])
            targets.append(ids[b, j])
    return F.cross_entropy(torch.stack(rows), torch.stack(targets)), logits, len(targets)


@pytest.mark.parametrize("pad_is_eos", [True, False])
def test_loss_matches_hand_built_example(pad_is_eos):
    tok = make_tokenizer(pad_is_eos)
    model = make_model(tok)
    x = images(3)
    ids, mask = build_caption_targets(tok, ["a red circle ! !", "the star", "! a"], max_length=10)
    assert (ids == 0).sum() == 3  # id 0 ("!") is a real caption token here
    out = model(x, ids, mask)
    expected, ref_logits, count = _manual_loss(model, x, ids, n_real=[6, 3, 3])
    assert count == int(mask.sum())  # every caption token and each eos, nothing else
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    assert out.logits.shape == (3, 4 + ids.shape[1], len(tok))
    real = torch.cat([torch.ones(3, 4, dtype=torch.bool), mask.bool()], dim=1)
    torch.testing.assert_close(out.logits[real], ref_logits[real], rtol=1e-5, atol=1e-5)
    # ClipCap's original mask (ids != 0) would drop the three "!" targets; ours keeps them
    labels = build_caption_labels(ids, mask, model.prefix_length)
    assert int((labels == 0).sum()) == 3 and int((labels != IGNORE_INDEX).sum()) == count


def test_padding_ids_do_not_change_loss(tok):
    model = make_model(tok)
    x = images(3)
    ids, mask = build_caption_targets(
        tok, ["a red circle", "the star", "blue square and a small triangle"], 12
    )
    out = model(x, ids, mask)
    scrambled = ids.clone()
    pad = ~mask.bool()
    scrambled[pad] = torch.randint(0, len(tok), (int(pad.sum()),), generator=torch.Generator().manual_seed(1))
    scrambled[0, -1] = 0  # id 0 at a padded position is still padding
    assert not torch.equal(scrambled, ids)
    out2 = model(x, scrambled, mask)
    torch.testing.assert_close(out2.loss, out.loss, rtol=0, atol=1e-6)
    # the eos is trained: changing it changes the loss
    eos_changed = ids.clone()
    eos_changed[1, 2] = 5
    assert not torch.allclose(model(x, eos_changed, mask).loss, out.loss)


# ---- freezing ----------------------------------------------------------------------------------
@pytest.mark.parametrize("freeze_image, freeze_lm", [(True, True), (True, False), (False, True)])
def test_frozen_parts_get_no_gradients(tok, freeze_image, freeze_lm):
    model = make_model(
        tok, mapper="transformer", mapper_layers=1, freeze_image=freeze_image, freeze_lm=freeze_lm
    )
    model.train()
    assert model.image_encoder.training is not freeze_image
    assert model.lm.training is not freeze_lm
    assert model.mapper.training
    ids, mask = build_caption_targets(tok, ["a red circle", "the star"], 8)
    model(images(2), ids, mask).loss.backward()
    groups = {"image_encoder": not freeze_image, "lm": not freeze_lm, "mapper": True}
    for name, p in model.named_parameters():
        part = name.split(".")[0]
        assert p.requires_grad is groups[part], name
        if groups[part]:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    assert all(p.grad.abs().sum() > 0 for p in model.mapper.parameters())
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {part for part, on in groups.items() if on}


# ---- generation --------------------------------------------------------------------------------
def _reference_greedy(model, x, max_new_tokens, stops):
    """Plain greedy loop: full forward over inputs_embeds each step, argmax, stop at a stop token."""
    out = []
    with torch.no_grad():
        for b in range(x.shape[0]):
            embeds = model.encode_prefix(x[b : b + 1])  # (1, k, E)
            ids = []
            for _ in range(max_new_tokens):
                logits = model.lm(inputs_embeds=embeds).logits[0, -1]
                token = int(logits.argmax())
                if token in stops:
                    break
                ids.append(token)
                step = model.lm.get_input_embeddings()(torch.tensor([[token]]))
                embeds = torch.cat([embeds, step], dim=1)
            out.append(ids)
    return out


def test_greedy_matches_reference_loop(tok):
    model = make_model(tok, mapper="transformer", mapper_layers=1).double().eval()
    x = images(3).double()
    ref = _reference_greedy(model, x, 9, {tok.eos_token_id})
    assert model.generate_ids(x, strategy="greedy", max_new_tokens=9) == ref
    # a stop token cuts the caption before it
    stop = ref[0][2]
    ref_stop = _reference_greedy(model, x, 9, {tok.eos_token_id, stop})
    got = model.generate_ids(x, strategy="greedy", max_new_tokens=9, stop_token_ids=[stop])
    assert got == ref_stop and len(got[0]) == ref[0].index(stop)


@pytest.mark.parametrize("strategy", ["greedy", "beam", "nucleus"])
def test_strategies_return_valid_sequences(tok, strategy):
    model = make_model(tok)
    model.train()
    torch.manual_seed(0)
    stop = [3]
    out = model.generate_ids(images(4), strategy=strategy, max_new_tokens=6, num_beams=3, stop_token_ids=stop)
    assert len(out) == 4 and model.training  # training mode restored
    for row in out:
        assert len(row) <= 6
        assert all(0 <= t < len(tok) and t not in (3, tok.eos_token_id) for t in row)
    texts = model.generate(images(4), strategy=strategy, max_new_tokens=6, num_beams=3)
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)


def test_generation_argument_errors(tok):
    model = make_model(tok)
    with pytest.raises(ValueError, match="strategy"):
        model.generate(images(1), strategy="sample")
    with pytest.raises(ValueError, match="positions"):
        model.generate(images(1), max_new_tokens=100)


def test_overfit_then_each_strategy_recovers_captions_and_stops(tok):
    """Train on three captions of different lengths; every decoder must return them and stop at eos."""
    captions = ["a red circle", "the blue square and a small green star !", "yellow triangle"]
    model = make_model(tok, freeze_lm=False)
    x = images(3)
    ids, mask = build_caption_targets(tok, captions, max_length=12)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for _ in range(100):
        opt.zero_grad()
        loss = model(x, ids, mask).loss
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    for strategy in ("greedy", "beam", "nucleus"):
        torch.manual_seed(0)
        got = model.generate(x, strategy=strategy, max_new_tokens=15, num_beams=3, top_p=0.8)
        assert got == captions, strategy
    lengths = [len(r) for r in model.generate_ids(x, max_new_tokens=15)]
    assert lengths == [3, 9, 2]


def test_lm_and_tokenizer_from_local_directory(tok, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), **LM))
    lm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = PrefixCaptioner(create_model("tiny-vit"), lm=str(tmp_path), prefix_length=2)
    assert model.tokenizer.eos_token_id == tok.eos_token_id
    # mmclip's HFTokenizer wrapper is unwrapped to its transformers tokenizer
    from mmclip.tokenizers import HFTokenizer

    wrapped = CaptionTokenizer(HFTokenizer(tmp_path))
    assert wrapped.encode("a red circle !") == [1, 3, 7, 0] and wrapped.eos_token_id == tok.eos_token_id
    loaded = model.lm.state_dict()
    assert loaded.keys() == lm.state_dict().keys()
    for name, value in lm.state_dict().items():
        assert torch.equal(value, loaded[name]), name
