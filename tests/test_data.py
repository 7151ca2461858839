"""Data specs, loaders, skips, split, sampler and transforms (CPU, no model)."""

from __future__ import annotations

import io
import json
import os
import random
import tarfile

import numpy as np
import pytest
import torch
from fault_cases_data import CASES, DataFault, bomb_png, pairs_folder, run_case
from PIL import Image

from semmim import data as data_module
from semmim import synthetic
from semmim.cli import main as cli_main
from semmim.data import (
    Collator,
    DataError,
    PairDataset,
    Record,
    ResumableBatchSampler,
    SkipLog,
    expand_braces,
    load_image,
    make_loader,
    open_data,
    split_records,
)
from semmim.data import images as data_images
from semmim.data import records as data_records
from semmim.tokenizer import load_tokenizer
from semmim.transforms import (
    EvalTransform,
    TrainTransform,
    sample_rng,
    swap_left_right,
    to_rgb,
)


def _png(path, colour=(200, 30, 30), size=(40, 30), mode="RGB") -> None:
    Image.new(mode, size, colour if mode == "RGB" else colour + (255,)).save(path)


def _png_bytes(colour=(10, 200, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------ transforms
def test_swap_left_right_whole_words_and_case():
    assert swap_left_right("a cat on the left, Right of a leftover") == (
        "a cat on the right, Left of a leftover"
    )
    assert swap_left_right("upright") == "upright"


def test_to_rgb_composites_transparency_on_background():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgb = to_rgb(rgba, background=(255, 255, 255))
    assert rgb.mode == "RGB"
    assert rgb.getpixel((1, 1)) == (255, 255, 255)
    assert rgb.getpixel((0, 0)) == (0, 0, 255)


def test_train_transform_deterministic_and_flip_swaps_caption():
    image = Image.fromarray(np.arange(64 * 48 * 3, dtype=np.uint8).reshape(48, 64, 3))
    t = TrainTransform(32, scale=(0.5, 1.0), flip="swap")
    a = t(image, "a dog on the left", sample_rng(0, 1, 7))
    b = t(image, "a dog on the left", sample_rng(0, 1, 7))
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert a[0].shape == (3, 32, 32)
    captions = {t(image, "a dog on the left", sample_rng(0, 0, i))[1] for i in range(40)}
    assert captions == {"a dog on the left", "a dog on the right"}
    never = {
        TrainTransform(32, flip="none")(image, "left", sample_rng(0, 0, i))[1] for i in range(20)
    }
    assert never == {"left"}


def test_flip_really_mirrors_the_image():
    array = np.zeros((16, 16, 3), dtype=np.uint8)
    array[:, :8] = 255  # white left half
    image = Image.fromarray(array)
    t = TrainTransform(16, scale=(1.0, 1.0), flip="swap")
    for i in range(20):
        x, cap = t(image, "white on the left", sample_rng(0, 0, i))
        left_brighter = x[:, :, :8].mean() > x[:, :, 8:].mean()
        assert left_brighter == (cap == "white on the left")


def test_transform_validation():
    with pytest.raises(ValueError, match="flip"):
        TrainTransform(32, flip="maybe")
    with pytest.raises(ValueError, match="scale"):
        TrainTransform(32, scale=(0.0, 1.0))


# ------------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_and_captions_describe_scene():
    a = np.asarray(synthetic.render(0, "train", 5, 64))
    b = np.asarray(synthetic.render(0, "train", 5, 64))
    assert np.array_equal(a, b)
    objects = synthetic.scene(0, "train", 5)
    cap = synthetic.caption(objects)
    for o in objects:
        assert f"{o.size} {o.colour} {o.shape} {synthetic.POSITIONS[o.cell]}" in cap
    # The object's colour is really at its position.
    o = objects[0]
    image = np.asarray(synthetic.render(0, "train", 5, 128)).astype(int)
    x, y = int(o.centre[0] * 128), int(o.centre[1] * 128)
    assert np.abs(image[y, x] - np.array(synthetic.COLOURS[o.colour])).max() < 40
    source = open_data(None)
    assert source.class_names == list(synthetic.SHAPES)
    assert len(source.val) == 500 and source.val[0].key.startswith("val/")
    assert {r.caption for r in source.val[:50]} != {r.caption for r in source.train[:50]}


def test_synthetic_spec_size_and_errors():
    assert len(open_data("synthetic:100").train) == 100
    assert len(open_data("synthetic:100:7").val) == 7
    with pytest.raises(ValueError, match="integers"):
        open_data("synthetic:lots")


# ----------------------------------------------------------------------------- folder spec
@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "stamps"
    for cls, colour in (("animals", (200, 0, 0)), ("food", (0, 200, 0))):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            _png(root / cls / f"{cls}{i}.png", colour, mode="RGBA" if i % 2 else "RGB")
            (root / cls / f"{cls}{i}.txt").write_text(f"A {cls} number {i}.\nfr.utf8=Un {cls}\n")
    (root / "food" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (root / "food" / "corrupt.txt").write_text("a broken picture\n")
    _png(root / "food" / "empty.png")
    (root / "food" / "empty.txt").write_text("\n")
    (root / "food" / "orphan.txt").write_text("a caption without image\n")
    _png(root / "food" / "nocaption.png")  # not a sample: no .txt
    return root


def test_folder_listing_classes_and_listing_skips(folder):
    source = open_data(f"folder:{folder}", val_size=2, split_seed=0)
    assert source.class_names == ["animals", "food"]
    assert len(source.train) + len(source.val) == 9  # 8 good + corrupt (found at load time)
    assert len(source.val) == 2
    assert source.skips.counts == {"empty caption": 1, "missing image": 1}
    assert source.prompt_template.format(name="food") == "a picture of food"
    caps = {r.caption for r in source.train + source.val}
    assert "A animals number 0." in caps
    labels = {r.key.split("/")[0]: r.label for r in source.train + source.val}
    assert labels == {"animals": 0, "food": 1}


def test_corrupt_image_skipped_and_counted_through_loader(folder):
    source = open_data(f"folder:{folder}", val_size=0, split_seed=0)
    records = source.train
    dataset = PairDataset(records, TrainTransform(32), seed=0)
    collate = Collator(load_tokenizer(), max_len=16)
    sampler = ResumableBatchSampler(len(dataset), batch_size=3, seed=0)
    skips = SkipLog()
    n_good = 0
    for batch in make_loader(dataset, sampler, collate, num_workers=0):
        for key, reason in batch["bad"]:
            skips.add(reason, key)
        if "images" in batch:
            n_good += len(batch["images"])
            assert batch["images"].shape[1:] == (3, 32, 32)
            assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert skips.total == 1 and next(iter(skips.keys))[1] == "food/corrupt.png"
    assert n_good == 8


def test_load_image_errors(tmp_path):
    with pytest.raises(OSError):
        load_image(str(tmp_path / "missing.png"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises((OSError, SyntaxError)):
        load_image(str(bad))


def test_bad_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="KIND:PATH"):
        open_data("nonsense")
    with pytest.raises(ValueError, match="unknown data kind 'zip'"):
        open_data("zip:/x")
    with pytest.raises(ValueError, match="not a directory"):
        open_data(f"folder:{tmp_path / 'nope'}")


# ------------------------------------------------------------------------------ json / csv
def test_json_albef_list_and_coco(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png")
    albef = [
        {"image": "0.png", "caption": ["first caption", "second caption"]},
        {"image": "1.png", "caption": "one caption"},
        {"image": "2.png", "captions": [""]},
        {"image": "missing.png", "caption": "gone"},
    ]
    (tmp_path / "a.json").write_text(json.dumps(albef))
    source = open_data(f"json:{tmp_path / 'a.json'}", val_size=0)
    assert [r.caption for r in source.train] == ["first caption", "second caption", "one caption"]
    assert source.train[0].key == source.train[1].key == "0.png"
    assert source.skips.counts == {"empty caption": 1, "missing image": 1}

    coco = {
        "images": [{"id": 7, "file_name": "0.png"}, {"id": 8, "file_name": "1.png"}],
        "annotations": [
            {"image_id": 7, "caption": "a"},
            {"image_id": 7, "caption": "b"},
            {"image_id": 8, "caption": "c"},
        ],
    }
    (tmp_path / "c.json").write_text(json.dumps(coco))
    source = open_data(f"json:{tmp_path / 'c.json'}", val_size=1)
    assert len(source.train) + len(source.val) == 3
    # all captions of one image land on the same side of the split
    assert {r.key for r in source.train}.isdisjoint({r.key for r in source.val})


@pytest.mark.parametrize("kind,sep", [("csv", ","), ("tsv", "\t")])
def test_csv_tsv(tmp_path, kind, sep):
    for i in range(3):
        _png(tmp_path / f"im{i}.png")
    lines = [
        sep.join(["filepath", "title", "label"]),
        sep.join(["im0.png", "a red thing", "red"]),
        sep.join(["im1.png", "a blue thing", "blue"]),
        sep.join(["im2.png", "", "red"]),
        sep.join(["gone.png", "x", "red"]),
    ]
    f = tmp_path / f"d.{kind}"
    f.write_text("\n".join(lines) + "\n")
    source = open_data(f"{kind}:{f}", val_size=0)
    assert [r.caption for r in source.train] == ["a red thing", "a blue thing"]
    assert source.class_names == ["blue", "red"]
    assert [r.label for r in source.train] == [1, 0]
    assert source.skips.total == 2
    bad = tmp_path / f"bad.{kind}"
    bad.write_text(sep.join(["picture", "caption"]) + "\n")
    with pytest.raises(ValueError, match="no image column"):
        open_data(f"{kind}:{bad}")


# ------------------------------------------------------------------------------------- wds
def _shard(path, samples, mode="w"):
    with tarfile.open(path, mode) as tar:
        for key, files in samples.items():
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_expand_braces():
    assert expand_braces("s-{00..02}.tar") == ["s-00.tar", "s-01.tar", "s-02.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]


def test_wds_shards_braces_glob_and_skips(tmp_path):
    _shard(
        tmp_path / "shard-000.tar",
        {
            "s0": {"png": _png_bytes(), "txt": b"a green square\n"},
            "s1": {"jpg": b"not a jpeg at all", "txt": b"a corrupt one"},
            "s2": {"txt": b"caption only"},
        },
    )
    _shard(
        tmp_path / "shard-001.tar.gz",
        {
            "d/s3": {"png": _png_bytes((1, 2, 3)), "txt": b"  \n"},
            "d/s4": {"png": _png_bytes(), "txt": b"ok"},
        },
        mode="w:gz",
    )
    source = open_data(f"wds:{tmp_path}/shard-{{000..001}}.tar*", val_size=0)
    assert sorted(r.caption for r in source.train) == ["a corrupt one", "a green square", "ok"]
    assert source.skips.counts == {"missing image": 1, "empty caption": 1}
    loaded = {}
    for r in source.train:
        try:
            loaded[r.caption] = load_image(r.image).convert("RGB").getpixel((0, 0))
        except (OSError, SyntaxError):
            loaded[r.caption] = None
    assert loaded == {"a green square": (10, 200, 10), "ok": (10, 200, 10), "a corrupt one": None}
    assert len(open_data(f"wds:{tmp_path}/shard-*.tar", val_size=0).train) == 2
    with pytest.raises(ValueError, match="matches no files"):
        open_data(f"wds:{tmp_path}/none-*.tar")


# ---------------------------------------------------------------------------- split, sampler
def test_split_is_deterministic_disjoint_and_grouped():
    records = [Record(f"{i}.png", f"c{i}{j}", f"k{i}") for i in range(50) for j in range(2)]
    train, val = split_records(records, 0.2, seed=3)
    again = split_records(list(reversed(records)), 0.2, seed=3)
    assert {r.key for r in val} == {r.key for r in again[1]}
    assert len({r.key for r in val}) == 10
    assert {r.key for r in train}.isdisjoint({r.key for r in val})
    with pytest.raises(ValueError, match="no training images"):
        split_records(records, 50, seed=0)


def test_sampler_resume_and_sharding():
    full = ResumableBatchSampler(23, 4, seed=1)
    full.set_epoch(2)
    batches = list(full)
    assert len(batches) == 5 and all(len(b) == 4 for b in batches)
    assert all(e == 2 for b in batches for e, _ in b)
    part = ResumableBatchSampler(23, 4, seed=1)
    part.set_epoch(2, start_batch=3)
    assert list(part) == batches[3:]
    r0, r1 = (ResumableBatchSampler(23, 4, seed=1, rank=r, world_size=2) for r in (0, 1))
    i0 = {i for b in r0 for _, i in b}
    i1 = {i for b in r1 for _, i in b}
    assert len(r0) == len(r1) == 2 and i0.isdisjoint(i1)
    with pytest.raises(ValueError, match="batch_size"):
        ResumableBatchSampler(3, 4)


def test_loader_same_batches_with_and_without_workers_and_no_global_rng_use():
    source = open_data("synthetic:40")
    dataset = PairDataset(source.train, TrainTransform(32, scale=(0.8, 1.0)), seed=0)
    collate = Collator(load_tokenizer(), max_len=24)

    def run(workers):
        sampler = ResumableBatchSampler(len(dataset), 8, seed=0)
        sampler.set_epoch(1, 2)
        return list(make_loader(dataset, sampler, collate, num_workers=workers))

    torch.manual_seed(0)
    random.seed(0)
    before = torch.get_rng_state()
    a = run(0)
    assert torch.equal(before, torch.get_rng_state())
    b = run(2)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert torch.equal(x["images"], y["images"]) and torch.equal(x["input_ids"], y["input_ids"])


def test_eval_transform_shape():
    x, cap = EvalTransform(48)(Image.new("RGBA", (30, 60)), "c")
    assert x.shape == (3, 48, 48) and cap == "c"


# ------------------------------------------------------------------- bad data (issue 10 §7, §9)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_data_is_skipped_and_counted_or_a_clear_error(case: DataFault, tmp_path):
    run_case(case, tmp_path)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 64 * 16).round().astype(np.uint16).reshape(16, 64)
    Image.fromarray(values).save(tmp_path / "deep.png")
    image = load_image(str(tmp_path / "deep.png"))
    assert image.mode.startswith("I")  # Pillow keeps the 16 bits
    rgb = np.asarray(to_rgb(image)).astype(int)
    expected = np.rint(values / 257.0).astype(int)
    assert np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)
    assert rgb.min() == 0 and rgb.max() == 255 and len(np.unique(rgb)) > 200
    assert (rgb == 255).mean() < 0.01  # Pillow's convert("RGB") made 99.6% of these white
    x, _ = EvalTransform(16)(image, "c")
    assert x.std() > 0.5  # a gradient, not a white square


def test_float_tiff_is_scaled_from_unit_range_not_black(tmp_path):
    """A 32-bit float TIFF (mode F, 0..1) goes through the same conversion as 16-bit PNGs."""
    values = np.linspace(0, 1, 64 * 16, dtype=np.float32).reshape(16, 64)
    values[0, :3] = (np.nan, -0.5, 7.0)  # NaN is black, out-of-range values are clipped
    Image.fromarray(values).save(tmp_path / "float.tif")
    image = load_image(str(tmp_path / "float.tif"))
    assert image.mode == "F"
    assert np.asarray(image.convert("RGB"))[1:].max() <= 1  # what Pillow alone makes of it
    rgb = np.asarray(to_rgb(image)).astype(int)
    expected = np.clip(np.rint(np.nan_to_num(values.astype(np.float64) * 255.0)), 0, 255)
    assert np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 1], expected)
    assert tuple(rgb[0, :3, 0]) == (0, 0, 255) and len(np.unique(rgb)) > 200
    x, _ = EvalTransform(16)(image, "c")
    assert x.std() > 0.5  # a gradient, not a black square


def test_upper_case_pair_and_ignored_files_are_reported(tmp_path):
    root = pairs_folder(tmp_path / "d", n=2)
    (root / "X.PNG").write_bytes((root / "good0.png").read_bytes())
    (root / "X.TXT").write_text("upper case\n")
    (root / "thumb.png").write_bytes((root / "good0.png").read_bytes())  # no caption file
    (root / "good1.svg").write_text("<svg/>")  # second format of a listed picture
    source = open_data(f"folder:{root}", 0)
    assert {r.caption for r in source.train} >= {"upper case"}
    assert [r.key for r in source.train if r.caption == "upper case"] == ["X.PNG"]
    assert source.ignored == {
        "image files without a caption file": 1,
        "other formats of a listed picture": 1,
    }
    text = source.describe()
    assert "1 image files without a caption file" in text and "split seed 0" in text


def _svg_folder(root):
    pairs_folder(root, n=8)
    for i in range(5):
        (root / f"vec{i}.svg").write_text(
            '<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8">'
            '<rect width="8" height="8" fill="#ff0000"/></svg>'
        )
        (root / f"vec{i}.txt").write_text(f"a vector picture {i}\n")
    return f"folder:{root}"


def test_missing_svg_decoder_is_counted_by_split_and_named(tmp_path, monkeypatch):
    spec = _svg_folder(tmp_path / "d")
    with_svg = open_data(spec, 4)
    reason = "SVG image: cairosvg not installed (pip install 'cairosvg>=2.7', semmim's [svg] extra)"
    monkeypatch.setattr(data_images, "svg_decoder_problem", lambda: reason)
    source = open_data(spec, 4)
    svg_keys = {f"vec{i}.svg" for i in range(5)}
    # The split does not move with the installed packages: the same images, minus the SVGs.
    assert {r.key for r in source.val} == {r.key for r in with_svg.val} - svg_keys
    n_val = len(svg_keys & {r.key for r in with_svg.val})
    assert source.decoder_skips == {reason: {"train": 5 - n_val, "held-out": n_val}}
    assert source.skips.counts == {reason: 5}
    assert (
        f"5 SVG images skipped ({5 - n_val} train, {n_val} held-out): cairosvg not installed "
        "(pip install 'cairosvg>=2.7', semmim's [svg] extra)"
    ) in source.describe()
    assert not {r.key for r in source.train + source.val} & svg_keys


def test_svg_decoder_problem_says_what_to_install(monkeypatch):
    import builtins
    import sys
    import types

    real_import = builtins.__import__

    def fake_import(error):
        def imp(name, *args, **kwargs):
            if name == "cairosvg":
                raise error
            return real_import(name, *args, **kwargs)

        return imp

    monkeypatch.delitem(sys.modules, "cairosvg", raising=False)
    try:
        data_module.svg_decoder_problem.cache_clear()
        monkeypatch.setattr(builtins, "__import__", fake_import(ImportError("no cairosvg")))
        assert "pip install 'cairosvg>=2.7'" in data_module.svg_decoder_problem()
        data_module.svg_decoder_problem.cache_clear()
        monkeypatch.setattr(builtins, "__import__", fake_import(OSError("no library cairo-2")))
        assert "apt-get install libcairo2" in data_module.svg_decoder_problem()
        with pytest.raises(data_module.MissingDecoder, match="libcairo2"):
            load_image("x.svg")
        data_module.svg_decoder_problem.cache_clear()
        monkeypatch.setattr(builtins, "__import__", real_import)
        monkeypatch.setitem(sys.modules, "cairosvg", types.SimpleNamespace(__version__="2.5.2"))
        assert "cairosvg 2.5.2 is older than 2.7" in data_module.svg_decoder_problem()
    finally:
        monkeypatch.undo()
        data_module.svg_decoder_problem.cache_clear()


def test_svg_rasterised_and_entities_refused(tmp_path):
    problem = data_module.svg_decoder_problem()
    if problem:
        pytest.skip(problem)
    spec = _svg_folder(tmp_path / "d")
    image = load_image(str(tmp_path / "d" / "vec0.svg"))
    assert to_rgb(image).getpixel((3, 3)) == (255, 0, 0)
    assert open_data(spec, 0).decoder_skips == {}
    hostile = tmp_path / "xxe.svg"
    hostile.write_text(
        '<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY x SYSTEM "file:///etc/hostname">]>'
        '<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><text>&x;</text></svg>'
    )
    assert data_module.decode_failure(str(hostile)).startswith("unreadable image")


def test_split_has_its_own_seed(tmp_path):
    root = pairs_folder(tmp_path / "d", n=60)
    spec = f"folder:{root}"
    default = {r.key for r in open_data(spec, 0.2).val}
    assert default == {r.key for r in open_data(spec, 0.2, split_seed=0).val}
    other = open_data(spec, 0.2, split_seed=1)
    assert other.split_seed == 1 and "split seed 1" in other.describe()
    assert {r.key for r in other.val} != default and len(other.val) == len(default) == 12
    with pytest.raises(DataError, match="split_seed must be an int, got 1.5"):
        open_data(spec, 0.2, split_seed=1.5)
    synth = open_data("synthetic:20:5", split_seed=3)
    assert synth.split_seed == 3 and synth.train[0].image.seed == 3
    assert [r.caption for r in open_data("synthetic:20:5").val] != [r.caption for r in synth.val]


def test_verify_counts_nothing_and_check_counts_everything(folder):
    source = open_data(f"folder:{folder}", val_size=2)
    before = dict(source.skips.counts)
    result = source.verify(sample=4)
    assert dict(source.skips.counts) == before  # the loader counts the corrupt one when it meets it
    bad_held_out = "food/corrupt.png" in {r.key for r in source.val}
    assert result["train"][1] == 4 and result["held-out"] == (2 - bad_held_out, 2)
    full = source.check()
    assert full["train"][0] + full["held-out"][0] == 8 and source.skips.total == 3


def test_cli_data_check_survives_a_bomb_and_fails_on_all_bad(tmp_path, capsys):
    root = pairs_folder(tmp_path / "d")
    (root / "bomb.png").write_bytes(bomb_png())
    (root / "bomb.txt").write_text("big\n")
    assert cli_main(["data", f"folder:{root}", "--check", "--val-size", "0"]) == 0
    out = capsys.readouterr().out
    assert "train: 3 of 4 images decode" in out and "decompression-bomb" in out
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"junk")
    (bad / "a.txt").write_text("junk\n")
    assert cli_main(["data", f"folder:{bad}", "--check", "--val-size", "0"]) == 2
    assert "no training image can be decoded" in capsys.readouterr().err


def test_open_data_errors_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        open_data(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="cannot read"):
        open_data(f"json:{tmp_path / 'nope.json'}")
    (tmp_path / "bom.csv").write_bytes("\ufeffimage,caption\nx.png,a\n".encode())
    pairs_folder(tmp_path, n=1, name="x")
    (tmp_path / "bom.csv").write_bytes("\ufeffimage,caption\nx0.png,a caption\n".encode())
    assert [r.caption for r in open_data(f"csv:{tmp_path / 'bom.csv'}", 0).train] == ["a caption"]


def test_folder_record_order_is_by_path(tmp_path):
    # The record index feeds the sampler: the order must stay "sorted by path without extension".
    root = tmp_path / "d"
    for rel in ("k/chicken", "k/cartoon/x", "k/a", "k/B"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / f"{rel}.png").write_bytes(b"")
        (root / f"{rel}.txt").write_text(f"{rel}\n")
    keys = [r.key for r in open_data(f"folder:{root}", 0).train]
    assert keys == ["k/B.png", "k/a.png", "k/cartoon/x.png", "k/chicken.png"]


def test_wds_compression_is_told_by_content_not_name(tmp_path):
    _shard(tmp_path / "gz-inside.tar", {"s0": {"png": _png_bytes(), "txt": b"hidden gzip"}}, "w:gz")
    _shard(tmp_path / "PLAIN.TAR", {"s1": {"PNG": _png_bytes((1, 2, 3)), "TXT": b"upper"}})
    source = open_data(f"wds:{tmp_path}/*", 0)
    got = {r.caption: load_image(r.image).convert("RGB").getpixel((0, 0)) for r in source.train}
    assert got == {"hidden gzip": (10, 200, 10), "upper": (1, 2, 3)}
    assert [r.image.compressed for r in source.train] == [False, True]
    assert source.skips.total == 0


def test_verify_held_out_only_when_evaluating(tmp_path):
    from fault_cases_data import _held_out_bad

    source = open_data(_held_out_bad(tmp_path), 2)
    assert source.verify(held_out=False) == {"train": (4, 4), "held-out": (0, 2)}
    with pytest.raises(DataError, match=r"none of the 2 held-out images .*--no-eval"):
        source.verify()


# ------------------------------------------------------------------ decoded-image cache
def test_image_cache_gives_the_decoded_pixels_and_sees_rewritten_files(tmp_path, monkeypatch):
    monkeypatch.setattr(data_images, "_IMAGE_CACHE", data_images._ImageCache())
    path = str(tmp_path / "a.png")
    _png(path, colour=(200, 30, 30))
    first = load_image(path)
    assert load_image(path) is first  # the second load is the cached image
    assert np.array_equal(np.asarray(first), np.asarray(load_image(path, cache=False)))
    # a rewritten file (new size / mtime) is decoded again, never served stale
    _png(path, colour=(10, 20, 200), size=(41, 30))
    again = load_image(path)
    assert again is not first and again.getpixel((0, 0))[:3] == (10, 20, 200)
    # decode_failure (data --check, verify) decodes without filling the cache
    other = str(tmp_path / "b.png")
    _png(other)
    assert data_module.decode_failure(other) is None
    assert all(key[0] != other for key in data_images._IMAGE_CACHE.images)


def test_image_cache_budget_and_errors(tmp_path, monkeypatch):
    cache = data_images._ImageCache()
    monkeypatch.setattr(data_images, "_IMAGE_CACHE", cache)
    path = str(tmp_path / "a.png")
    _png(path)
    monkeypatch.setenv("SEMMIM_IMAGE_CACHE_MB", "0")
    assert load_image(path) is not load_image(path) and cache.bytes == 0  # off
    monkeypatch.setenv("SEMMIM_IMAGE_CACHE_MB", "1")
    load_image(path)
    assert cache.bytes == 40 * 30 * 3 <= 2**20
    for bad in ("lots", "-1"):
        monkeypatch.setenv("SEMMIM_IMAGE_CACHE_MB", bad)
        with pytest.raises(ValueError, match="SEMMIM_IMAGE_CACHE_MB"):
            data_module.image_cache_budget()
    monkeypatch.delenv("SEMMIM_IMAGE_CACHE_MB")
    with pytest.raises(OSError):  # a missing file is the decoder's error, cached or not
        load_image(str(tmp_path / "missing.png"))


# ------------------------------------------------------------------ validation split
def test_validation_is_carved_from_training_and_never_touches_held_out(tmp_path):
    from semmim.run_config import TrainConfig
    from semmim.train import open_run_data

    for i in range(40):
        _png(str(tmp_path / f"{i:02d}.png"), colour=(i * 5, 0, 0))
        (tmp_path / f"{i:02d}.txt").write_text(f"picture number {i}")
    spec = f"folder:{tmp_path}"
    plain = open_run_data(TrainConfig(data=spec, val_size=8))
    carved = open_run_data(TrainConfig(data=spec, val_size=8, validation=6, seed=5))
    assert plain.eval_split == "held-out" and carved.eval_split == "validation"
    held = {r.key for r in plain.val}
    val, train = {r.key for r in carved.val}, {r.key for r in carved.train}
    assert len(val) == 6 and len(train) == 32 - 6
    assert val | train == {r.key for r in plain.train}  # carved from the training pairs only
    assert not (val | train) & held  # the held-out pairs are not in the source at all
    # fixed by the split seed, not by the training seed; another split seed moves it
    assert {
        r.key for r in open_run_data(TrainConfig(data=spec, val_size=8, validation=6)).val
    } == val
    moved = open_run_data(TrainConfig(data=spec, val_size=8, validation=6, split_seed=1))
    assert {r.key for r in moved.val} != val
    assert "6 validation pairs (6 images) carved from the training data" in carved.describe()
    with pytest.raises(ValueError, match="train.validation"):
        TrainConfig(validation=-1)
    with pytest.raises(ValueError, match="no training images"):
        open_run_data(TrainConfig(data=spec, val_size=8, validation=32))
    with pytest.raises(ValueError, match="already"):
        carved.carve_validation(2, 0)


def test_collator_image_ids_follow_the_image_key():
    records = [Record(f"{k}.png", f"caption {i}", k) for i, k in enumerate("aabca")]
    col = Collator(load_tokenizer(), 16, records)
    items = [
        {"image": torch.zeros(3, 4, 4), "caption": r.caption, "index": i, "label": -1}
        for i, r in enumerate(records)
    ]
    batch = col(items)
    ids = batch["image_ids"].tolist()
    assert ids[0] == ids[1] == ids[4] and len({ids[0], ids[2], ids[3]}) == 3
    assert all(0 <= x < 2**63 for x in ids) and ids[2] == data_module.image_id("b")
    assert "image_ids" not in Collator(load_tokenizer(), 16)(items)


# ------------------------------------------------------------ issue 19 §2: files named elsewhere
def test_paths_refuse_special_files_from_stat_and_links_out(tmp_path):
    from fault_cases_data import deadline

    from semmim.paths import NotRegularFile, file_problem, inside, open_regular

    (tmp_path / "d").mkdir()
    regular = tmp_path / "d" / "a.txt"
    regular.write_text("hi")
    os.mkfifo(tmp_path / "d" / "pipe")
    (tmp_path / "d" / "in").symlink_to(regular)
    (tmp_path / "d" / "out").symlink_to(tmp_path / "elsewhere.txt")
    (tmp_path / "elsewhere.txt").write_text("secret")
    root = str(tmp_path / "d")
    assert file_problem(str(regular), "caption file", root) is None
    assert file_problem(str(tmp_path / "d" / "in"), "caption file", root) is None
    assert file_problem(str(tmp_path / "d" / "out"), "x") is None  # no root: links anywhere
    assert file_problem(str(tmp_path / "d" / "out"), "x", root) == "x links outside the data folder"
    assert (
        file_problem(str(tmp_path / "d" / "pipe"), "image")
        == "image is not a regular file (a FIFO)"
    )
    assert file_problem("/dev/null", "image") == "image is not a regular file (a character device)"
    assert file_problem(root, "image") == "image is not a regular file (a directory)"
    assert file_problem(str(tmp_path / "nope"), "image") == "missing image"
    assert inside(str(regular), root) and not inside(root, root)
    with deadline("open_regular on a FIFO", 20):
        with pytest.raises(NotRegularFile, match="pipe: image is not a regular file") as err:
            open_regular(str(tmp_path / "d" / "pipe"), "image")
        assert err.value.reason == "image is not a regular file (a FIFO)"
        # decoding: the same rule, as a counted skip reason
        assert data_module.decode_failure(str(tmp_path / "d" / "pipe")) == err.value.reason
    with open_regular(str(regular)) as f:
        assert f.read() == b"hi"


def test_caption_limit_reads_a_bounded_prefix(tmp_path, monkeypatch):
    """What listing reads of a caption is CAPTION_MAX_BYTES + 1, whatever the file's size."""
    monkeypatch.setattr(data_records, "CAPTION_MAX_BYTES", 8)
    root = pairs_folder(tmp_path / "d", n=1, name="ok")
    (root / "ok0.txt").write_text("short\n" + "z" * 50)
    (root / "long.png").write_bytes((root / "ok0.png").read_bytes())
    (root / "long.txt").write_text("123456789")  # 9 bytes: one over
    (root / "edge.png").write_bytes((root / "ok0.png").read_bytes())
    (root / "edge.txt").write_text("12345678\nrest")  # exactly at the limit
    _shard(
        tmp_path / "s.tar.gz",
        {"a": {"png": _png_bytes(), "txt": b"x" * 100}, "b": {"png": _png_bytes(), "txt": b"fine"}},
        "w:gz",
    )
    source = open_data(f"folder:{root}", 0)
    assert sorted(r.caption for r in source.train) == ["12345678", "short"]
    assert source.skips.counts == {"caption over 8 bytes": 1}
    source = open_data(f"wds:{tmp_path}/s.tar.gz", 0)
    assert [r.caption for r in source.train] == ["fine"]
    assert source.skips.keys == {("caption over 8 bytes", "s.tar.gz/a")}


def test_wds_sparse_1p5_gb_text_member_is_listed_without_reading_it(tmp_path):
    """An uncompressed shard whose .txt member declares 1.5 GB (sparse: no disk is written):
    listing reads a prefix and seeks past the rest (issue 19 §2)."""
    from run_helpers import open_data_peak

    size = 1_500_000_000
    path = tmp_path / "big.tar"
    with open(path, "wb") as f:
        for name, data in (("s0.png", _png_bytes()), ("s0.txt", b"a green square\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            f.write(info.tobuf() + data + b"\0" * (-len(data) % 512))
        info = tarfile.TarInfo("s1.txt")
        info.size = size
        f.write(info.tobuf() + b"huge caption ")
        f.seek(size - len(b"huge caption "), os.SEEK_CUR)  # a hole, not 1.5 GB of writes
        f.write(b"\0" * (-size % 512))
        for name, data in (("s1.png", _png_bytes((1, 2, 3))),):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            f.write(info.tobuf() + data + b"\0" * (-len(data) % 512))
        f.write(b"\0" * 1024)
    assert os.path.getsize(path) > size and os.stat(path).st_blocks * 512 < 10 * 2**20
    source, peak = open_data_peak(f"wds:{path}")
    assert [r.caption for r in source.train] == ["a green square"]
    assert source.skips.counts == {"caption over 16384 bytes": 1}
    assert peak < 4 * 2**20, f"listing allocated {peak / 2**20:.1f} MiB"
