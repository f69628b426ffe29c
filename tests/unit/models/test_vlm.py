"""The Flamingo-style bridge: gates at 0 give the frozen LM's logits, media masking matches a plain loop,
cached generation matches uncached, and only the bridge trains."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import mmclip
from mmclip.layers.gated_xattn import GatedCrossAttentionBlock, media_index
from mmclip.models.vlm import CHUNK_TOKEN, MEDIA_TOKEN, VisionLanguageModel, decoder_blocks

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from mmclip.tokenizers import train_bpe_tokenizer

    words = "question: what colour is the circle square? answer: red blue green how many shapes are there one two"
    out = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer([words] * 10, 300, out)
    return out


def _parts(tokenizer_dir, seed: int = 0):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=len(tok), n_layer=3, n_embd=32, n_head=2, n_positions=128,
                                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    lm = transformers.GPT2LMHeadModel(config).eval()
    return tok, lm, copy.deepcopy(lm), mmclip.create_model("tiny-vit")


def _open_gates(vlm, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in vlm.cross_attn:
            block.attn_gate.copy_(torch.randn((), generator=g))
            block.ff_gate.copy_(torch.randn((), generator=g))


def test_closed_gates_give_the_frozen_language_models_logits(tokenizer_dir):
    tok, lm, reference, image = _parts(tokenizer_dir)
    vlm = VisionLanguageModel(image, lm, tok, cross_attn_every=2)
    assert len(vlm.cross_attn) == 2  # before blocks 0 and 2 of 3
    text = tok(["how many shapes are there? answer: two", "what colour is the circle?"], return_tensors="pt",
               padding=True, add_special_tokens=False)
    images = torch.randn(2, 1, 3, 32, 32)
    vocab = reference.config.vocab_size
    with torch.no_grad():
        expected = reference(**text).logits
        for imgs in (None, images):  # text without images, and the same text with images given
            got = vlm(text["input_ids"], imgs, text["attention_mask"])
            assert got.shape[-1] == vocab + 2
            torch.testing.assert_close(got[..., :vocab], expected, atol=1e-6, rtol=0)
        # text with image markers: the LM's own computation on the same (extended) embeddings
        ids = tok([f"{MEDIA_TOKEN}what colour is the circle? answer: red{CHUNK_TOKEN}"], return_tensors="pt",
                  add_special_tokens=False)["input_ids"]
        embeds = lm.get_input_embeddings()(ids)
        torch.testing.assert_close(vlm(ids, images[:1])[..., :vocab], reference(inputs_embeds=embeds).logits,
                                   atol=1e-6, rtol=0)


def _reference_block(block: GatedCrossAttentionBlock, x, media, index):
    """Per token, by hand: attend to exactly the latents of its image; no image, no change."""
    out = x.clone()
    B, L, _ = x.shape
    H, d = block.heads, block.dim_head
    for b in range(B):
        for t in range(L):
            i = int(index[b, t])
            if i == 0:
                continue
            h = x[b, t]
            q = block.to_q(block.norm(h)).view(H, d)
            k, v = block.to_kv(media[b, i - 1]).view(-1, 2, H, d).unbind(1)  # (n, H, d) each
            weights = torch.softmax(torch.einsum("hd,nhd->hn", q, k) / math.sqrt(d), dim=-1)
            h = h + torch.tanh(block.attn_gate) * block.to_out(torch.einsum("hn,nhd->hd", weights, v).reshape(-1))
            out[b, t] = h + torch.tanh(block.ff_gate) * block.ff(h)
    return out


def test_media_masking_matches_a_plain_loop():
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(dim=16, media_dim=12, heads=2, dim_head=8, ff_mult=2)
    with torch.no_grad():
        block.attn_gate.fill_(0.7)
        block.ff_gate.fill_(-0.4)
    media_id = 99
    ids = torch.tensor([[5, 99, 6, 7, 99, 8, 9], [4, 4, 4, 99, 5, 5, 5], [1, 2, 3, 4, 5, 6, 7]])
    index = media_index(ids, media_id)
    assert index.tolist() == [[0, 1, 1, 1, 2, 2, 2], [0, 0, 0, 1, 1, 1, 1], [0] * 7]
    x = torch.randn(3, 7, 16)
    media = torch.randn(3, 2, 4, 12)  # two images of 4 latents per sample
    with torch.no_grad():
        got = block(x, media, index)
        torch.testing.assert_close(got, _reference_block(block, x, media, index), atol=1e-5, rtol=1e-5)
    assert torch.equal(got[2], x[2]) and torch.equal(got[0, 0], x[0, 0])  # no image yet: unchanged
    # continuing a count under a cache
    assert media_index(torch.tensor([[7, 99]]), media_id, torch.tensor([2])).tolist() == [[2, 3]]


def test_cached_generation_equals_uncached(tokenizer_dir):
    tok, lm, _, image = _parts(tokenizer_dir)
    vlm = VisionLanguageModel(image, lm, tok).eval()
    _open_gates(vlm)
    prompts = [f"{MEDIA_TOKEN}what colour is the circle? answer:",
               f"{MEDIA_TOKEN}how many shapes are there? answer: two{CHUNK_TOKEN}{MEDIA_TOKEN}what colour is the "
               "square? answer:"]
    images = torch.randn(2, 2, 3, 32, 32)
    enc = vlm.encode_prompts(prompts)
    assert (enc["attention_mask"][0] == 0).any()  # left padding in the batch
    cached = vlm.generate(enc["input_ids"], images, enc["attention_mask"], max_new_tokens=6, use_cache=True)
    plain = vlm.generate(enc["input_ids"], images, enc["attention_mask"], max_new_tokens=6, use_cache=False)
    assert cached.shape[1] >= 1 and torch.equal(cached, plain)
    # the images matter once the gates are open
    with torch.no_grad():
        a = vlm(enc["input_ids"], images, enc["attention_mask"])
        b = vlm(enc["input_ids"], images * 3 + 1, enc["attention_mask"])
    assert not torch.allclose(a, b)


def test_only_the_bridge_trains_and_the_frozen_weights_stay_bit_identical(tokenizer_dir):
    tok, lm, reference, image = _parts(tokenizer_dir)
    tower_before = copy.deepcopy(image.image_tower.state_dict())
    vlm = VisionLanguageModel(image, lm, tok)
    names = {n.split(".")[0] for n, _ in vlm.named_parameters()}
    assert names == {"resampler", "new_token_embed", "cross_attn"}
    opt = torch.optim.AdamW(vlm.parameters(), lr=1e-2, weight_decay=0.1)
    ids = tok([f"{MEDIA_TOKEN}what colour is the circle? answer: red{CHUNK_TOKEN}"] * 2, return_tensors="pt",
              add_special_tokens=False)["input_ids"]
    for _ in range(3):
        logits = vlm(ids, torch.randn(2, 1, 3, 32, 32))
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(float(b.attn_gate.detach()) != 0 for b in vlm.cross_attn)
    vlm.verify_unchanged()
    frozen_lm = {k: v for k, v in vlm.lm.frozen.state_dict().items()}
    for key, value in reference.state_dict().items():  # the LM's own tensors, under its wrapped blocks
        wrapped = key.replace(".h.0.", ".h.0.block.").replace(".h.1.", ".h.1.block.").replace(".h.2.", ".h.2.block.")
        wrapped = wrapped.replace("wte.weight", "wte.base.weight").replace("lm_head.weight", "lm_head.base.weight")
        assert torch.equal(frozen_lm[wrapped], value), key
    for key, value in tower_before.items():
        assert torch.equal(vlm.featurizer.tower.state_dict()[key], value), key
    # the checkpoint holds the bridge and the frozen parts' fingerprints, not the frozen weights
    keys = set(vlm.state_dict())
    assert {"lm.fingerprint", "featurizer.fingerprint"} <= keys
    assert not any(k.startswith(("lm.frozen", "featurizer.frozen")) for k in keys)


def test_errors_name_the_problem(tokenizer_dir):
    tok, lm, _, image = _parts(tokenizer_dir)
    with pytest.raises(TypeError, match="decoder blocks"):
        decoder_blocks(torch.nn.Linear(2, 2))
    from transformers import AutoTokenizer

    short = AutoTokenizer.from_pretrained(tokenizer_dir)
    big = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(short) + 5, n_layer=1, n_embd=16,
                                                               n_head=2))
    with pytest.raises(ValueError, match="tokenizer has"):
        VisionLanguageModel(image, big, short)
