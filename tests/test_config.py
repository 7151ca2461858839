"""Config presets, dotted overrides, validation messages, dict round trip."""

import dataclasses
import json

import pytest

from semmim import SemMIMConfig, from_preset
from semmim.config import PRESETS


def test_presets_have_exact_names():
    assert list(PRESETS) == ["tiny", "small", "base"]


def test_base_is_paper_scale():
    c = from_preset("base")
    assert (c.vision.image_size, c.vision.patch_size, c.vision.dim, c.vision.depth) == (
        224,
        16,
        768,
        12,
    )
    assert c.vision.num_patches == 196
    assert (c.text.dim, c.text.depth, c.fusion.depth) == (768, 6, 6)
    assert (c.head.hidden, c.head.bottleneck, c.head.num_prototypes) == (2048, 256, 8192)
    assert (c.itc.embed_dim, c.itc.queue_size, c.itc.temp, c.itc.alpha) == (256, 65536, 0.07, 0.4)
    assert c.momentum.momentum == 0.995
    assert (c.glob.student_temp, c.glob.teacher_temp, c.glob.center_momentum) == (0.1, 0.04, 0.9)
    assert (c.mim.teacher_temp, c.mim.teacher_temp_final) == (0.04, 0.07)
    assert c.masking.ratio == 0.5 and c.mlm.prob == 0.15


def test_small_text_tower_matches_minilm():
    t = from_preset("small").text
    assert (t.dim, t.depth, t.heads, t.intermediate, t.vocab_size) == (384, 6, 12, 1536, 30522)


@pytest.mark.parametrize("name", ["tiny", "small", "base"])
def test_dict_round_trip_is_json_safe(name):
    c = from_preset(name)
    d = json.loads(json.dumps(c.to_dict()))
    assert SemMIMConfig.from_dict(d) == c


def test_overrides_as_kwargs_or_dict():
    a = from_preset("tiny", **{"mim.target": "pixel", "vision.depth": 1})
    b = from_preset("tiny", {"mim.target": "pixel", "vision.depth": 1})
    assert a == b and a.mim.target == "pixel" and a.vision.depth == 1
    assert from_preset("tiny").mim.target == "semantic"  # presets are not mutated
    assert from_preset("tiny", **{"itc.temp": 0.1}).itc.temp == 0.1


def test_configs_are_frozen():
    c = from_preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.vision.depth = 3


def test_num_masked_is_round_r_p():
    for ratio in [0.0, 0.25, 0.4, 0.5, 0.75, 0.9]:
        c = from_preset("tiny", **{"masking.ratio": ratio})
        assert c.num_masked == round(ratio * c.vision.num_patches)


@pytest.mark.parametrize(
    "name, overrides, words",
    [
        ("huge", {}, ["preset", "'huge'", "tiny", "small", "base"]),
        ("tiny", {"mim.foo": 1}, ["mim.foo", "target", "text_in_target"]),
        ("tiny", {"nosection.x": 1}, ["nosection.x", "vision", "mim"]),
        ("tiny", {"mim": 1}, ["mim"]),
        ("tiny", {"masking.ratio": 1.5}, ["masking.ratio", "1.5"]),
        ("tiny", {"masking.ratio": -0.1}, ["masking.ratio"]),
        ("tiny", {"masking.ratio": 0.99}, ["masking.ratio", "all 16 patches"]),
        ("tiny", {"vision.depth": "2"}, ["vision.depth", "int"]),
        ("tiny", {"vision.depth": 2.0}, ["vision.depth", "int"]),
        ("tiny", {"mim.enabled": 1}, ["mim.enabled", "bool"]),
        ("tiny", {"mim.target": "dvae"}, ["mim.target", "semantic", "pixel"]),
        ("tiny", {"masking.strategy": "block"}, ["masking.strategy", "text_guided"]),
        ("tiny", {"vision.image_size": 70}, ["vision.image_size", "patch_size"]),
        ("tiny", {"vision.heads": 3}, ["vision.heads"]),
        ("tiny", {"itc.temp": 0.9}, ["itc.temp", "temp_max"]),
        ("tiny", {"itc.queue_size": -1}, ["itc.queue_size"]),
        ("tiny", {"loss.mim": -1.0}, ["loss.mim"]),
        ("tiny", {"momentum.momentum": 1.5}, ["momentum.momentum"]),
        ("tiny", {"glob.teacher_temp": 0.0}, ["glob.teacher_temp"]),
        ("tiny", {"mlm.prob": float("nan")}, ["mlm.prob"]),
    ],
)
def test_bad_values_raise_naming_the_field(name, overrides, words):
    with pytest.raises(ValueError) as e:
        from_preset(name, overrides)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_from_dict_rejects_unknown_keys():
    d = from_preset("tiny").to_dict()
    d["vision"]["depthh"] = 3
    with pytest.raises(ValueError, match="vision.depthh"):
        SemMIMConfig.from_dict(d)
    with pytest.raises(ValueError, match="extra"):
        SemMIMConfig.from_dict({"extra": {}})


def test_importing_semmim_and_building_a_config_imports_no_kernel():
    """``import semmim``, reading the op list and building (and validating) any preset load
    neither torch, Triton, ``semmim._C`` nor an op module: only the registry's declarations."""
    import subprocess
    import sys

    code = (
        "import sys, semmim\n"
        "from semmim import from_preset\n"
        "from semmim.kernels import OP_NAMES\n"
        "for name in ('tiny', 'small', 'base'):\n"
        "    from_preset(name, {'kernels.cross_attention': 'sdpa'})\n"
        "try:\n"
        "    from_preset('tiny', {'kernels.topk_mask': 'sdpa'})\n"
        "except ValueError as e:\n"
        "    print(e)\n"
        "print(sorted(m for m in sys.modules if m in ('torch', 'triton') or m.startswith(("
        "'torch.', 'triton.', 'semmim._C', 'semmim.kernels'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0].startswith("kernels.topk_mask: unknown backend 'sdpa'"), out
    assert out[1] == "['semmim.kernels', 'semmim.kernels.registry']", out


def test_the_op_list_has_one_source():
    """The registry's OP_SPECS is the one op list: KernelsConfig has a field and OpCalls a
    method per op, config validation uses the declared backends, and no other module of the
    package spells out op names together (a second list)."""
    import ast
    from pathlib import Path

    from semmim.config import KernelsConfig
    from semmim.kernels.registry import OP_NAMES, OP_SPECS
    from semmim.layers import OpCalls

    assert OP_NAMES == tuple(OP_SPECS)
    assert [f.name for f in dataclasses.fields(KernelsConfig)] == ["backend", *OP_NAMES, "validate"]
    assert all(getattr(OpCalls, op).__name__ == op for op in OP_NAMES)
    for op, spec in OP_SPECS.items():  # every declared backend is accepted, nothing else
        for backend in spec.backends:
            assert (
                from_preset("tiny", {f"kernels.{op}": backend}).kernels.backend_for(op) == backend
            )
    with pytest.raises(ValueError, match=r"kernels\.topk_mask: unknown backend 'sdpa'"):
        from_preset("tiny", {"kernels.topk_mask": "sdpa"})
    root = Path(__file__).resolve().parents[1]
    for path in [*(root / "semmim").rglob("*.py"), *(root / "kernels").glob("*.py")]:
        if path.name == "registry.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        exports = {  # a module's __all__ names what it defines, not the op list
            id(n.value)
            for n in ast.walk(tree)
            if isinstance(n, ast.Assign)
            and any(getattr(t, "id", "") == "__all__" for t in n.targets)
        }
        for node in ast.walk(tree):
            if id(node) in exports:
                continue
            if isinstance(node, (ast.List, ast.Tuple, ast.Set, ast.Dict)):
                items = node.keys if isinstance(node, ast.Dict) else node.elts
                named = {c.value for c in items if isinstance(c, ast.Constant)} & set(OP_NAMES)
                assert len(named) < 2, f"{path}:{node.lineno}: a second op list {sorted(named)}"
