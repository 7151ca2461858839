"""Captioning: decoder initialised from the encoders, KV-cached decoding == uncached, beam 1 ==
greedy, beam search, label-smoothed LM loss, pycocoevalcap metrics."""

from __future__ import annotations

import shutil

import pytest
import torch

from semmim import from_preset
from semmim.downstream.decoder import KVCache, generate
from semmim.downstream.models import CaptionModel, pretrained_towers


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One intra-op thread (conftest's ``one_thread``) for every test here."""


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = from_preset("tiny")
    m = CaptionModel(cfg, 0.1, pretrained_towers(cfg)).eval()
    # Larger random embeddings and output bias than at init, so that greedy decoding of the
    # untrained decoder varies from token to token and image to image (a real test of the cache).
    with torch.no_grad():
        m.decoder.position_embeddings.weight.normal_(0, 1.0)
        m.decoder.word_embeddings.weight.normal_(0, 1.0)
        m.decoder.head.bias.normal_(0, 1.0)
    return m


def test_decoder_starts_from_the_encoder_weights():
    torch.manual_seed(0)
    cfg = from_preset("tiny")
    towers = pretrained_towers(cfg)
    dec = CaptionModel(cfg, 0.1, towers).decoder
    td = cfg.text.depth
    assert torch.equal(dec.layers[0].attn.qkv.weight, towers.text.layers[0].attn.qkv.weight)
    assert dec.layers[0].cross is None
    assert torch.equal(dec.layers[td].cross.kv.weight, towers.fusion.layers[0].cross.kv.weight)
    assert torch.equal(dec.layers[td].mlp[0].weight, towers.fusion.layers[0].mlp[0].weight)
    assert torch.equal(dec.word_embeddings.weight, towers.text.word_embeddings.weight)
    assert dec.head.word_embeddings is dec.word_embeddings  # tied LM head
    assert torch.equal(dec.head.dense.weight, towers.mlm_head.dense.weight)


def test_cached_steps_match_the_full_causal_forward(model):
    image = model.vision(torch.randn(2, 3, 64, 64))
    ids = torch.randint(1000, 2000, (2, 7))
    full = model.decoder(ids, image)  # (2, 7, V)
    cache = KVCache()
    steps = [model.decoder(ids[:, :3], image, cache)]  # a 3-token prefix, then one at a time
    steps += [model.decoder(ids[:, t : t + 1], None, cache) for t in range(3, 7)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
    # a later token never changes an earlier position's logits (causality)
    ids2 = ids.clone()
    ids2[:, 5:] = 7
    torch.testing.assert_close(model.decoder(ids2, image)[:, :5], full[:, :5])


def test_kv_cache_decoding_equals_uncached_decoding(model):
    image = model.vision(torch.randn(3, 3, 64, 64))
    tok = model.tokenizer
    args = (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id)
    cached = generate(model.decoder, image, *args, max_len=12, use_cache=True)
    plain = generate(model.decoder, image, *args, max_len=12, use_cache=False)
    assert cached.shape[1] > 2 and torch.equal(cached, plain)
    assert len(set(cached[0, 1:].tolist())) > 1  # a real sequence, not one token repeated
    assert not torch.equal(cached[0], cached[1])
    beam1 = generate(model.decoder, image, *args, max_len=12, beam_size=1)
    assert torch.equal(beam1, cached)
    b3c = generate(model.decoder, image, *args, max_len=12, beam_size=3, use_cache=True)
    b3p = generate(model.decoder, image, *args, max_len=12, beam_size=3, use_cache=False)
    assert torch.equal(b3c, b3p)


def test_generate_errors_and_lm_loss(model):
    image = model.vision(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="beam_size"):
        generate(model.decoder, image, 1, 2, 0, beam_size=0)
    tok = model.tokenizer(
        ["a red circle", "a small blue star on the left"], padding=True, return_tensors="pt"
    )
    images = torch.randn(2, 3, 64, 64)
    loss, parts = model(images, tok["input_ids"], tok["attention_mask"])
    assert loss.ndim == 0 and torch.isfinite(loss) and set(parts) == {"lm"}
    # the loss is the label-smoothed next-token cross-entropy over the non-pad positions,
    # computed by hand in float64 from the model's own logits (ε = 0.1 and ε = 0)
    ids, am = tok["input_ids"], tok["attention_mask"]
    with torch.no_grad():
        logits = model.decoder(ids[:, :-1], model.vision(images)).double()  # (B, T-1, V)
    logp = logits.log_softmax(-1)
    keep = am[:, 1:].bool()  # predicted positions: the next token is not padding
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0][keep]  # (n,)
    uniform = -logp.mean(-1)[keep]  # (n,): cross-entropy against the uniform distribution
    assert keep.sum() < keep.numel()  # padding was left out
    for eps, m in ((0.1, model), (0.0, CaptionModel(model.cfg, 0.0, pretrained_towers(model.cfg)))):
        m.load_state_dict(model.state_dict())
        got = m.eval()(images, ids, am)[0]
        want = ((1 - eps) * nll + eps * uniform).mean()
        assert abs(got.item() - want.item()) <= 1e-5 * want.item(), (eps, got.item(), want.item())
    with pytest.raises(ValueError, match="label_smoothing"):
        CaptionModel(model.cfg, 1.0)
    caps = model.generate(torch.randn(2, 3, 64, 64), beam_size=2, max_len=5)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)


def test_caption_metrics_from_pycocoevalcap():
    pytest.importorskip("pycocoevalcap")
    from semmim.downstream.caption_metrics import caption_metrics

    refs = {
        "a": ["a red circle in the top left", "a large red circle at the top left"],
        "b": ["a small blue star on the right", "a blue star on the right"],
        "c": ["a green square at the bottom", "a small green square at the bottom"],
    }
    good = caption_metrics({"a": refs["a"][0], "b": refs["b"][0], "c": refs["c"][0]}, refs)
    bad = caption_metrics({"a": "a cat", "b": "two dogs", "c": "a tree"}, refs)
    for key in ("BLEU-4", "ROUGE-L", "CIDEr"):
        assert good[key] > bad[key], key
    assert good["BLEU-1"] == pytest.approx(100.0)
    if shutil.which("java"):
        assert good["METEOR"] > bad["METEOR"] and "PTB" in good["tokenizer"]
    else:
        assert "METEOR" in good["skipped"]
    with pytest.raises(ValueError, match="keys"):
        caption_metrics({"a": "x"}, refs)
