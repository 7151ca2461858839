"""Sharded checkpoints: the writer and reader :mod:`semmim.checkpoint` uses for ``--fsdp`` runs.

A sharded step is a directory beside the single-file steps, found, verified, rotated and named by
``latest`` through the same functions (:func:`semmim.checkpoint.save_checkpoint`,
:func:`semmim.checkpoint.open_checkpoint`)::

    RUN/checkpoints/step_00000100/            one sharded step (the newest ``keep`` are kept)
        __0_0.distcp  __1_0.distcp            model + optimizer tensors: each rank wrote its shards
        .metadata                             torch.distributed.checkpoint's index of the shards
        meta.pt                               everything else (step, data position, RNG states,
                                              configs, optimizer hyper-parameters): plain data
        manifest.json                         {"format": 3, "files": {name: {bytes, sha256}}}
    RUN/checkpoints/latest                    "step_00000100" (a directory name here)

Writing (:func:`write_sharded`, every rank): rank 0 prepares ``.step_<N>.tmp/``; all ranks write
their shards into it with ``torch.distributed.checkpoint.save``; rank 0 then writes ``meta.pt``,
hashes every file into ``manifest.json`` (last), fsyncs, and renames the directory to
``step_<N>`` — so a step directory exists only complete, and a crash (a rank SIGKILLed) leaves a
dot-temp directory that no reader picks and the next save removes.

Reading (:func:`read_sharded`): the manifest first (every file present, same size, same SHA-256;
an error names the file), then ``meta.pt`` with ``torch.load(weights_only=True)``, then the tensors
through ``torch.distributed.checkpoint.load``. Its own reader would unpickle ``.metadata`` with
plain ``pickle`` and its planner unpickles non-tensor entries with ``weights_only=False``: here
``.metadata`` is unpickled by :class:`_MetadataUnpickler`, which builds only the classes of DCP's
index (and tensor dtypes / sizes), and a checkpoint with a non-tensor entry is refused — so no
file of a checkpoint can name code to run. Tensors are read from the shards with
``weights_only=True`` (DCP's own rule). The tensors are read whole, whatever the number of ranks
that wrote them, and :func:`load_into` puts them into an unsharded model or cuts each rank's
shards of an FSDP model from them — so a step resumes on any number of processes.

The tensors of a step are the model's and the optimizer's state in the form of
``torch.distributed.checkpoint.state_dict.get_state_dict`` (parameter names as keys, so they map
onto a sharded or an unsharded model alike), flattened to ``model/<name>`` and
``optimizer/<name>/<key>``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import warnings
from typing import Any

import torch
from torch import nn

from semmim.paths import NotRegularFile, open_regular
from semmim.rundir import atomic_write, file_sha256, fsync_dir

FORMAT = 3  # 3 = sharded directory: DCP shards + meta.pt + manifest.json
MANIFEST = "manifest.json"
META = "meta.pt"
_DCP_META = ".metadata"


class ShardedCheckpointError(ValueError):
    """Raised by this module; :mod:`semmim.checkpoint` re-raises it as its CheckpointError."""


# ------------------------------------------------------------------------------- state dicts
def flat_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, list]:
    """(``{"model/<name>": tensor, "optimizer/<name>/<key>": tensor}``, optimizer param groups).

    Every rank calls it (for a sharded model the tensors are DTensors: this rank's shards). The
    param groups (plain data: lr, betas, parameter names) go into ``meta.pt``.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        msd, osd = get_model_state_dict(model), {"state": {}, "param_groups": []}
    else:
        msd, osd = get_state_dict(model, optimizer)
    flat = {f"model/{k}": v for k, v in msd.items()}
    for name, st in osd["state"].items():
        for key, v in st.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(
                    f"optimizer state {name}.{key} is a {type(v).__name__}, not a tensor"
                )
            flat[f"optimizer/{name}/{key}"] = v
    return flat, osd["param_groups"]


def unflatten(flat: dict[str, torch.Tensor], groups: list) -> tuple[dict, dict]:
    """Inverse of :func:`flat_tensors`: (model state dict, optimizer state dict by names)."""
    model: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        kind, _, rest = key.partition("/")
        if kind == "model":
            model[rest] = v
        else:
            name, _, sub = rest.rpartition("/")
            state.setdefault(name, {})[sub] = v
    return model, {"state": state, "param_groups": groups}


# ------------------------------------------------------------------------------------ writing
def temp_dir(ckpt_dir: str, step: int) -> str:
    """Where step ``step`` is written before its rename (every rank computes the same name)."""
    return os.path.join(ckpt_dir, f".step_{step:08d}.tmp")


def write_sharded(
    meta: dict[str, Any], flat: dict[str, torch.Tensor], ckpt_dir: str, step: int, is_main: bool
) -> str | None:
    """Write one sharded step (every rank calls it, with its own ``flat`` shards); returns the
    final directory on rank 0 (None elsewhere). ``latest`` and rotation are the caller's."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    distributed = dist.is_available() and dist.is_initialized()
    tmp = temp_dir(ckpt_dir, step)
    if is_main:
        os.makedirs(ckpt_dir, exist_ok=True)
        if os.path.lexists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    if distributed:
        dist.barrier()
    # one file per rank, fsync'ed; the coordinator (rank 0) writes .metadata after all shards
    with warnings.catch_warnings():  # one process: "assuming the intent is to save in a single"
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(flat, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True, thread_count=1))
    if distributed:
        dist.barrier()
    if not is_main:
        return None
    atomic_write(os.path.join(tmp, META), lambda f: torch.save(meta, f))
    files = {}
    for name in sorted(os.listdir(tmp)):
        path = os.path.join(tmp, name)
        if os.path.isfile(path) and not name.endswith(".tmp"):
            files[name] = {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}
    manifest = {"format": FORMAT, "step": step, "files": files}
    atomic_write(
        os.path.join(tmp, MANIFEST), lambda f: f.write(json.dumps(manifest, indent=1).encode())
    )
    final = os.path.join(ckpt_dir, f"step_{step:08d}")
    if os.path.lexists(final):
        # the same step again (a resume that stops before its first step): move the old copy
        # aside first; os.replace cannot replace a non-empty directory
        old = os.path.join(ckpt_dir, f".step_{step:08d}.old.tmp")
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(ckpt_dir)
    return final


# ------------------------------------------------------------------------------------ reading
def _err(path: str, what: str) -> ShardedCheckpointError:
    return ShardedCheckpointError(f"{path}: {what}")


def verify_sharded(directory: str) -> dict[str, Any]:
    """Check every file of ``manifest.json``: present, regular, same size and SHA-256. Returns
    the manifest. Raises :class:`ShardedCheckpointError` naming the file and what is wrong."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open_regular(path, "checkpoint manifest") as f:
            manifest = json.loads(f.read(1 << 22).decode("utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT}")
    except FileNotFoundError:
        raise _err(
            path,
            "missing (semmim writes it last, before renaming the step directory: the write "
            "was interrupted, or the directory was not written by semmim)",
        ) from None
    except NotRegularFile as err:
        raise ShardedCheckpointError(str(err)) from None
    except (ValueError, KeyError, TypeError, OSError) as err:
        raise _err(path, f"unreadable manifest ({err})") from None
    for name in (META, _DCP_META):
        if name not in files:
            raise _err(path, f"does not list {name}")
    for name, want in files.items():
        file = os.path.join(directory, name)
        if os.path.basename(name) != name or name.startswith(".."):
            raise _err(path, f"lists {name!r}, not a file of this directory; refused")
        if os.path.islink(file) or not os.path.isfile(file):
            raise _err(file, "missing or not a regular file (listed in manifest.json)")
        size = os.path.getsize(file)
        if size != int(want["bytes"]):
            how = "truncated" if size < int(want["bytes"]) else "bytes appended"
            raise _err(file, f"{size} bytes, but {want['bytes']} were written ({how})")
        sha = file_sha256(file)
        if sha != want["sha256"]:
            raise _err(
                file,
                f"checksum mismatch (sha256 {sha[:16]}..., recorded {str(want['sha256'])[:16]}...)"
                ": the file changed after it was written (corrupt disk or copy, flipped bits)",
            )
    return manifest


# What DCP's index may name besides the classes defined in its metadata module (dataclasses and
# enums of the index) and torch dtypes / memory formats: sizes, paths, plain containers.
_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("copyreg", "_reconstructor"),
    ("builtins", "object"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` building only the index's own classes, :data:`_ALLOWED` and
    torch dtypes / memory formats; anything else (a reference to code) raises UnpicklingError."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == _DCP_METADATA_MODULE:
            import torch.distributed.checkpoint.metadata as md

            cls = getattr(md, name, None)
            if isinstance(cls, type) and cls.__module__ == _DCP_METADATA_MODULE:
                return cls
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.memory_format, torch.layout)
        ):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"Unsupported global {module}.{name}")


def read_index(directory: str):
    """DCP's ``Metadata`` of a sharded step, unpickled safely; only tensor entries accepted."""
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    path = os.path.join(directory, _DCP_META)
    try:
        with open(path, "rb") as f:
            index = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as err:
        raise _err(
            path, f"refused: it names code to run ({err}); a checkpoint index holds only data"
        ) from None
    except (EOFError, OSError, ValueError, TypeError, AttributeError, KeyError) as err:
        raise _err(path, f"unreadable index ({type(err).__name__}: {err})") from None
    if not isinstance(index, Metadata):
        raise _err(path, f"holds a {type(index).__name__}, not a checkpoint index")
    for key, md in index.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            raise _err(path, f"entry {key!r} is not a tensor; refused (semmim saves tensors only)")
    for info in (index.storage_data or {}).values():
        rel = str(getattr(info, "relative_path", ""))
        if os.path.basename(rel) != rel or rel.startswith(".") and rel != _DCP_META:
            raise _err(path, f"points at {rel!r}, not a shard file of this directory; refused")
    return index


def _reader(directory: str):
    """DCP's file reader with the safe index loader."""
    import torch.distributed.checkpoint as dcp

    class _SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            from torch.distributed.checkpoint.metadata import StorageMeta

            index = read_index(directory)
            if getattr(index, "storage_meta", None) is None:
                index.storage_meta = StorageMeta()
            index.storage_meta.load_id = self.load_id
            return index

    return _SafeReader(directory)


def _planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class _TensorsOnly(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            raise ShardedCheckpointError(
                f"entry {read_item.dest_index.fqn!r} is pickled data, not a tensor; refused"
            )

    return _TensorsOnly()


def read_meta(directory: str) -> dict[str, Any]:
    """``meta.pt`` (plain data, ``weights_only=True``)."""
    path = os.path.join(directory, META)
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _err(path, f"refused by the safe loader ({str(err).splitlines()[0][:200]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise _err(path, f"unreadable ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(meta, dict):
        raise _err(path, f"holds a {type(meta).__name__}, not a dict")
    return meta


def load_full(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded step, whole (this process alone reads all shards it needs)."""
    import torch.distributed.checkpoint as dcp

    index = read_index(directory)
    flat = {
        k: torch.empty(tuple(md.size), dtype=md.properties.dtype)
        for k, md in index.state_dict_metadata.items()
    }
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(flat, storage_reader=_reader(directory), planner=_planner(), no_dist=True)
    except ShardedCheckpointError:
        raise
    except Exception as err:  # DCP wraps a reader's errors into CheckpointException
        raise _err(
            directory, f"cannot read the shards ({type(err).__name__}: {str(err)[:300]})"
        ) from None
    return flat


def read_sharded(directory: str, verify: bool = True) -> dict[str, Any]:
    """The state of a sharded step as a single-file checkpoint holds it: ``model`` (full tensors),
    ``optimizer`` (by parameter names, :func:`unflatten`), ``sharded`` True, and the rest of
    ``meta.pt``."""
    if verify:
        verify_sharded(directory)
    meta = read_meta(directory)
    model, optimizer = unflatten(load_full(directory), meta.pop("optimizer_groups", []))
    return {**meta, "model": model, "optimizer": optimizer, "sharded": True}


def by_names(
    state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """``state`` with its optimizer state keyed by parameter names: a sharded step's already is;
    a single-file checkpoint's (``optimizer.state_dict()``: parameters numbered in the order of
    ``optimizer``'s groups) is renamed, so it can resume an FSDP run too."""
    if state.get("sharded"):
        return state
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    osd = state["optimizer"]
    return {
        **state,
        "optimizer": {
            "state": {order[i]: v for i, v in osd["state"].items()},
            "param_groups": [
                {**g, "params": [order[i] for i in g["params"]]} for g in osd["param_groups"]
            ],
        },
    }


def _like(full: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``current``: this rank's shard when ``current`` is a DTensor (cut
    locally from the full tensor every rank holds: no communication), else ``full`` itself."""
    mesh = getattr(current, "device_mesh", None)
    if mesh is None:
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(current.device), mesh, current.placements, src_data_rank=None)


def load_into(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Put a checkpoint's ``model`` / ``optimizer`` (full tensors, optimizer state by parameter
    names: what :func:`read_sharded` and :func:`by_names` return) into ``model`` and
    ``optimizer``, sharded (FSDP2) or not: each rank keeps the part of every tensor its shards
    hold. Missing or unexpected names are errors (``load_state_dict``'s strict rule)."""
    current = model.state_dict()
    full = state["model"]
    model.load_state_dict(
        {k: _like(full[k], current[k]) if k in current else full[k] for k in full}, strict=True
    )
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    index = {names[id(p)]: i for i, p in enumerate(params)}
    osd = state["optimizer"]
    unknown = sorted(set(osd["state"]) - set(index))
    if unknown:
        raise ValueError(f"optimizer state for unknown parameter(s) {unknown[:5]}")
    optimizer.load_state_dict(
        {
            "state": {
                index[n]: {
                    k: _like(v, params[index[n]]) if v.ndim > 0 else v for k, v in st.items()
                }
                for n, st in osd["state"].items()
            },
            "param_groups": [
                {**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]
            ],
        }
    )
