"""Retrieval split loader: Karpathy (COCO, Flickr30K) and ALBEF JSON, written as small files."""

import json

import pytest
import torch
from PIL import Image

from semmim import SemMIM, from_preset
from semmim.data import Collator, PairDataset
from semmim.downstream import load_retrieval_split
from semmim.eval import evaluate
from semmim.transforms import EvalTransform


def png(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 24), colour).save(path)


def sentences(*raw):
    return [{"raw": r, "tokens": r.lower().split(), "sentid": n} for n, r in enumerate(raw)]


@pytest.fixture
def coco(tmp_path):
    """A dataset_coco.json in Karpathy's layout: 2 train, 1 restval, 2 test (one file missing)."""
    images = []
    for n, (folder, split, caps) in enumerate(
        [
            ("train2014", "train", ["A red square.", "  a red box  ", "red"]),
            ("val2014", "restval", ["a green disc", "green"]),
            ("train2014", "train", ["blue thing", ""]),  # the empty caption is skipped
            ("val2014", "test", ["a yellow cat", "yellow", "a cat", "cat", "kitten"]),
            ("val2014", "test", ["never loaded"]),  # its file is missing
        ]
    ):
        name = f"COCO_{folder}_{n:012d}.jpg"
        if n != 4:
            png(tmp_path / "images" / folder / name, (40 * n, 0, 0))
        images.append(
            {
                "filepath": folder,
                "filename": name,
                "split": split,
                "sentences": sentences(*caps),
                "cocoid": 1000 + n,
                "imgid": n,
            }
        )
    file = tmp_path / "dataset_coco.json"
    file.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return file, tmp_path / "images"


def test_karpathy_coco_splits_ids_and_caption_maps(coco):
    file, root = coco
    train = load_retrieval_split(file, ("train", "restval"), image_root=root)
    assert [im.key for im in train.images] == ["1000", "1001", "1002"]
    assert [im.index for im in train.images] == [0, 1, 2]
    assert train.images[0].captions == ("A red square.", "a red box", "red")
    assert train.images[1].path == str(root / "val2014" / "COCO_val2014_000000000001.jpg")
    assert train.texts[3:5] == ["a green disc", "green"]
    assert train.txt2img == [0, 0, 0, 1, 1, 2]
    assert train.img2txt == [[0, 1, 2], [3, 4], [5]]
    assert train.skips.counts["empty caption"] == 1
    assert torch.equal(train.record_image_ids(), torch.tensor(train.txt2img))
    records = train.records()
    assert [r.caption for r in records] == train.texts
    assert [r.key for r in records] == ["1000"] * 3 + ["1001"] * 2 + ["1002"]

    test = load_retrieval_split(file, "test", image_root=root)
    assert [im.key for im in test.images] == ["1003"]  # the missing file is skipped, counted
    assert test.skips.counts["missing image"] == 1 and len(test.texts) == 5
    assert "1 images, 5 captions, 1 skipped" in test.describe()
    assert len(load_retrieval_split(file, "train", image_root=root).images) == 2


def test_karpathy_flickr_layout_without_filepath(tmp_path):
    png(tmp_path / "flickr30k-images" / "1000092795.jpg", (9, 9, 9))
    entry = {"filename": "1000092795.jpg", "split": "test", "imgid": 7}
    entry["sentences"] = sentences("Two young guys with shaggy hair", "Two friends enjoy time")
    file = tmp_path / "dataset_flickr30k.json"
    file.write_text(json.dumps({"images": [entry], "dataset": "flickr30k"}))
    split = load_retrieval_split(file, "test", image_root=tmp_path / "flickr30k-images")
    (im,) = split.images
    assert im.key == "7" and im.index == 0 and len(im.captions) == 2
    assert im.path.endswith("flickr30k-images/1000092795.jpg")


def test_albef_lists_group_captions_by_image_id(tmp_path):
    for n in range(3):
        png(tmp_path / "val2014" / f"{n}.jpg", (0, 60 * n, 0))
    train = [  # one entry per caption, as ALBEF's coco_train.json
        {"image": "val2014/0.jpg", "caption": "a dog", "image_id": "coco_10"},
        {"image": "val2014/1.jpg", "caption": "a cat", "image_id": "coco_11"},
        {"image": "val2014/0.jpg", "caption": "a brown dog", "image_id": "coco_10"},
    ]
    test = [  # caption lists, no image_id (the path identifies the image), as coco_test.json
        {"image": "val2014/2.jpg", "caption": ["a bird", "a small bird"]},
        {"image": "val2014/1.jpg", "caption": ["a cat"]},
    ]
    (tmp_path / "coco_train.json").write_text(json.dumps(train))
    (tmp_path / "coco_test.json").write_text(json.dumps(test))
    tr = load_retrieval_split(tmp_path / "coco_train.json")  # image_root = the file's folder
    assert [(im.key, im.captions) for im in tr.images] == [
        ("coco_10", ("a dog", "a brown dog")),
        ("coco_11", ("a cat",)),
    ]
    assert tr.split == "coco_train" and tr.txt2img == [0, 0, 1]
    te = load_retrieval_split(tmp_path / "coco_test.json")
    assert [im.key for im in te.images] == ["val2014/2.jpg", "val2014/1.jpg"]
    assert te.img2txt == [[0, 1], [2]]


def test_bad_files_raise_naming_the_problem(tmp_path, coco):
    file, root = coco
    with pytest.raises(ValueError, match=r"split: a Karpathy file .* needs split names"):
        load_retrieval_split(file)
    with pytest.raises(ValueError, match=r"split: .*got 'testing'"):
        load_retrieval_split(file, "testing")
    with pytest.raises(ValueError, match="no usable image in split 'val'"):
        load_retrieval_split(file, "val", image_root=root)
    albef = tmp_path / "list.json"
    albef.write_text(json.dumps([{"image": "a.jpg"}]))
    with pytest.raises(ValueError, match=r"no usable image .*entry without 'caption'"):
        load_retrieval_split(albef)  # the malformed entry is skipped and counted
    albef.write_text(json.dumps([{"image": "a.jpg", "caption": "x"}]))
    with pytest.raises(ValueError, match="split: .* pass None"):
        load_retrieval_split(albef, "test")
    (tmp_path / "odd.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="expected a Karpathy dict"):
        load_retrieval_split(tmp_path / "odd.json")
    png(tmp_path / "x.jpg", (1, 1, 1))
    png(tmp_path / "y.jpg", (1, 1, 1))
    albef.write_text(
        json.dumps(
            [
                {"image": "x.jpg", "caption": "one", "image_id": 5},
                {"image": "y.jpg", "caption": "two", "image_id": 5},
            ]
        )
    )
    sp = load_retrieval_split(albef)  # the second file under one id is skipped, named
    assert [im.path for im in sp.images] == [str(tmp_path / "x.jpg")]
    assert sp.skips.counts == {"image id already names another file": 1}
    assert sp.skips.keys == {("image id already names another file", "list.json[1]")}


def test_split_feeds_the_model_and_the_evaluation(coco):
    """records → PairDataset + Collator → model(image_ids=…); records → evaluate's grouping."""
    file, root = coco
    split = load_retrieval_split(file, ("train", "restval"), image_root=root)
    torch.manual_seed(0)
    model = SemMIM(from_preset("tiny"))
    S = model.cfg.vision.image_size
    dataset = PairDataset(split.records(), EvalTransform(S))
    batch = Collator(model.tokenizer, 16)([dataset[i] for i in range(len(dataset))])
    image_ids = split.record_image_ids()[batch["index"]]
    assert image_ids.tolist() == [0, 0, 0, 1, 1, 2]
    out = model(
        batch["images"], batch["input_ids"], batch["attention_mask"], seed=0, image_ids=image_ids
    )
    assert torch.isfinite(out.loss)
    result = evaluate(model, split.records(), image_size=S, max_len=16, rerank_k=0)
    assert (result["n_images"], result["n_texts"]) == (3, 6)


def test_typed_fields_duplicates_and_split_case(tmp_path, coco):
    """issue 19 §3: the loaders' typed checks, counted by reason with the entry named."""
    from semmim.data import SkipLog

    file, root = coco
    data = json.loads(file.read_text())
    data["images"][3]["split"] = "Test"  # case-insensitive
    data["images"].append({**data["images"][3], "split": "dev"})  # unknown split: counted
    data["images"].append(dict(data["images"][0]))  # the same image listed again
    file.write_text(json.dumps(data))
    skips = SkipLog()
    test = load_retrieval_split(file, "TEST", image_root=root, skips=skips)
    train = load_retrieval_split(file, ("train", "restval"), image_root=root, skips=skips)
    assert [im.key for im in test.images] == ["1003"] and test.split == "test"
    assert [len(im.captions) for im in train.images] == [3, 2, 1]  # not doubled
    assert skips.counts == {
        "unknown split name": 1,  # once, though both calls met it
        "missing image": 1,
        "empty caption": 1,
        "image listed twice": 1,
    }
    assert ("image listed twice", "dataset_coco.json:images[6]") in skips.keys
    assert (
        "image listed twice: 1" in train.describe() and "unknown split name: 1" in train.describe()
    )

    for n in range(3):
        png(tmp_path / f"{n}.jpg", (n, n, n))
    albef = tmp_path / "coco_train.json"
    albef.write_text(
        json.dumps(
            [
                {"image": "0.jpg", "caption": "a caption", "image_id": "coco_0"},
                {"image": "0.jpg", "caption": "a caption", "image_id": "coco_0"},  # repeated
                {"image": "0.jpg", "caption": "another", "image_id": "coco_0"},
                {"image": "1.jpg", "caption": None, "image_id": "coco_1"},
                {"image": "1.jpg", "caption": 7, "image_id": "coco_1"},
                {"image": "2.jpg", "caption": ["x", 3], "image_id": 2.0},
                {"image": "2.jpg", "caption": ["x", 3], "image_id": 2},
                {"image": None, "caption": "no image"},
            ]
        )
    )
    sp = load_retrieval_split(albef)
    assert [(im.key, im.captions) for im in sp.images] == [
        ("coco_0", ("a caption", "another")),
        ("2", ("x",)),
    ]
    assert sp.skips.counts == {
        "caption listed twice for one image": 1,
        "'caption' must be a string or a list of strings, got null": 1,
        "'caption' must be a string or a list of strings, got int": 2,
        "'image_id' must be a string or an integer, got float": 1,
        "'image' must be a non-empty string, got null": 1,
        "no caption": 1,
    }
    assert (
        "'caption' must be a string or a list of strings, got int",
        "coco_train.json[6].caption[1]",
    ) in sp.skips.keys
