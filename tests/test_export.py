"""``semmim export RUN --format hf DIR`` and ``SemMIM.from_pretrained(DIR)`` (semmim.export): the
round trip is bit-exact, the folder is what Hugging Face users expect, a user's folder is safe."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from semmim import SemMIM
from semmim.checkpoint import load_checkpoint
from semmim.cli import main
from semmim.config import SemMIMConfig
from semmim.export import ExportError, export_hf
from semmim.model import build_model


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One intra-op thread (conftest's ``one_thread``) for every test here."""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny pre-training run of 2 steps (its EMA differs from its trained weights)."""
    out = str(tmp_path_factory.mktemp("export") / "run")
    argv = ["train", "--preset", "tiny", "--data", "synthetic:16:8", "--batch-size", "4"]
    argv += ["--num-workers", "0", "--threads", "1", "--no-eval", "--steps", "2", "--out", out]
    assert main(argv) == 0
    return out


def _checkpoint(run):
    state = load_checkpoint(run)
    model = build_model(SemMIMConfig.from_dict(state["config"]), pretrained=False)
    model.load_state_dict(state["model"])
    return state, model.eval()


def _inputs(model):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 64, 64, generator=g)
    enc = model.tokenizer(["a red square", "two blue circles left of a star", "x"], padding=True)
    return images, torch.tensor(enc["input_ids"]), torch.tensor(enc["attention_mask"])


def test_export_round_trip_is_bit_exact(run, tmp_path, capsys):
    out = str(tmp_path / "hf")
    assert main(["export", run, "--format", "hf", out]) == 0
    assert "SemMIM.from_pretrained" in capsys.readouterr().out
    names = {"model.safetensors", "config.json", "README.md", "vocab.txt", "tokenizer.json"}
    names.add("tokenizer_config.json")
    assert names <= set(os.listdir(out))
    state, ref = _checkpoint(run)
    saved = load_file(os.path.join(out, "model.safetensors"))
    assert saved and all(k == "temp" or k.startswith("net.") for k in saved)
    for k, v in saved.items():
        assert torch.equal(v, state["model"][k]), k  # the file holds the checkpoint's tensors

    loaded = SemMIM.from_pretrained(out)
    assert not loaded.training
    own = loaded.state_dict()
    for k, v in state["model"].items():  # every trained tensor, the tied decoder included
        if k.startswith("net.") or k == "temp":
            assert own[k].dtype == v.dtype and torch.equal(own[k], v), k
    for k, v in loaded.net.state_dict().items():  # the EMA starts as the loaded weights
        assert torch.equal(loaded.ema.state_dict()[k], v), k
    images, ids, mask = _inputs(ref)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), ref.encode_image(images))
        assert torch.equal(loaded.encode_text(ids, mask), ref.encode_text(ids, mask))
        assert torch.equal(loaded.itm_score(images, ids, mask), ref.itm_score(images, ids, mask))

    # the loaded model trains as a fresh one does (EMA, queues and centres initialised), here a
    # bf16-autocast step on CPU as a GPU runs it
    loaded.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        step = loaded(images, ids, mask, seed=0)
    step.loss.backward()
    assert torch.isfinite(step.loss) and set(step.losses) == {"itc", "itm", "mlm", "glob", "mim"}
    assert loaded.net.vision.patch_embed.weight.grad is not None

    meta = json.load(open(os.path.join(out, "config.json")))
    assert meta["model_type"] == "semmim" and meta["weights"] == "net"
    assert SemMIMConfig.from_dict(meta["semmim_config"]) == ref.cfg
    assert meta["source"]["step"] == 2
    card = open(os.path.join(out, "README.md")).read()
    assert "SemMIM.from_pretrained" in card and "trained towers" in card and "step 2" in card


def test_export_ema_holds_the_momentum_weights(run, tmp_path):
    out = str(tmp_path / "hf_ema")
    meta = export_hf(run, out, ema=True)
    assert meta["weights"] == "ema"
    state, _ = _checkpoint(run)
    loaded = SemMIM.from_pretrained(out)
    differs = 0
    for k, v in loaded.net.state_dict().items():
        assert torch.equal(v, state["model"]["ema." + k]), k
        differs += not torch.equal(v, state["model"]["net." + k])
    assert differs > 0  # after 2 steps the EMA is not the trained weights
    assert "momentum (EMA)" in open(os.path.join(out, "README.md")).read()


def test_a_users_folder_is_not_overwritten(run, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["export", run, "--format", "hf", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err and "Traceback" not in err
    assert os.listdir(out) == ["notes.txt"]
    assert main(["export", run, "--format", "hf", str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "keep me"  # other files are left alone
    assert SemMIM.from_pretrained(str(out)).cfg.vision.dim == 64
    step_file = os.path.join(run, "checkpoints", "step_00000002.pt")
    for source, target in [
        (run, run),
        (run, os.path.join(run, "checkpoints")),
        (step_file, run),
        (os.path.join(run, "checkpoints"), os.path.join(run, "checkpoints", "x")),
    ]:
        with pytest.raises(ExportError, match="run's own folder"):
            export_hf(source, target, overwrite=True)
    export_hf(step_file, os.path.join(run, "export"))  # a new folder inside the run is fine
    other_run = tmp_path / "other_run"
    other_run.mkdir()
    (other_run / "log.csv").write_text("step\n")
    with pytest.raises(ExportError, match="holds a training run"):
        export_hf(run, str(other_run), overwrite=True)
    assert main(["export", str(tmp_path / "no_run"), "--format", "hf", str(tmp_path / "x")]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_an_altered_export_is_refused(run, tmp_path):
    out = str(tmp_path / "hf")
    export_hf(run, out)
    weights = os.path.join(out, "model.safetensors")
    data = bytearray(open(weights, "rb").read())
    data[-1] ^= 1  # one flipped bit in the last tensor
    open(weights, "wb").write(bytes(data))
    with pytest.raises(ExportError, match="checksum differs"):
        SemMIM.from_pretrained(out)
    with pytest.raises(ExportError, match="no config.json"):
        SemMIM.from_pretrained(str(tmp_path))
