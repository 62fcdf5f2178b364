"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP), loadable on any layout.

Every rank presents its tensors in the single-process layout: FSDP's DTensors as they are (DCP
knows their global shapes), a rank's expert slice ``(E/N, ...)`` as a DTensor sharded on the
expert dimension of a global ``(E, ...)`` tensor, and replicated tensors plainly (DCP writes
them once). Each rank then writes only its own shard, and loading reads, on whatever layout the
loading processes have (another expert-parallel size, another FSDP size, or one process), just
the slices each rank holds.

Keys: ``model.<name>`` for the model's state dict, ``optim.<parameter>.<moment>`` for the
optimizer's per-parameter state (the hyper-parameters travel in the trainer's ``state.pt``).

DCP's ``.metadata`` file is a pickle; it is read with an unpickler that admits only DCP's own
metadata classes and torch's sizes and dtypes, so a checkpoint still cannot execute code.
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from moesaic.parallel.grads import expert_param_names
from moesaic.parallel.groups import ParallelGroups

__all__ = [
    "save_state",
    "load_state",
    "load_full_weights",
    "read_metadata",
    "saved_shapes",
    "global_shapes",
    "MODEL_PREFIX",
    "OPTIM_PREFIX",
]

MODEL_PREFIX, OPTIM_PREFIX = "model.", "optim."
_meshes: dict[int, object] = {}  # expert group -> its 1-D DeviceMesh (plain expert parallelism)


class _MetadataUnpickler(pickle.Unpickler):
    _MODULES = (
        "torch.distributed.checkpoint.metadata",
        "torch.distributed.checkpoint.filesystem",
        "torch.distributed.checkpoint.planner",
    )
    _BUILTINS = {"set", "frozenset", "tuple", "list", "dict", "slice", "bytes"}

    def find_class(self, module: str, name: str):
        if module in self._MODULES or (module == "collections" and name == "OrderedDict"):
            return super().find_class(module, name)
        if module == "builtins" and name in self._BUILTINS:
            return super().find_class(module, name)
        if (module, name) == ("torch.serialization", "_get_layout"):  # name -> torch layout
            return super().find_class(module, name)
        if module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath"):
            return super().find_class(module, name)  # the checkpoint id it was written to
        if module in ("torch", "torch._C"):
            obj = getattr(torch, name, None)
            if name == "Size" or isinstance(obj, torch.dtype | torch.layout | torch.memory_format):
                return obj
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in DCP metadata")


class _Reader(dcp.FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        with open(Path(self.path) / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_metadata(directory: Path):
    """The DCP metadata of ``directory`` (read without executing anything)."""
    return _Reader(str(directory)).read_metadata()


def saved_shapes(directory: Path, prefix: str = MODEL_PREFIX) -> dict[str, torch.Size]:
    """Global shape of every tensor saved under ``prefix``, the prefix removed."""
    meta = read_metadata(directory).state_dict_metadata
    return {
        k[len(prefix) :]: torch.Size(m.size)
        for k, m in meta.items()
        if k.startswith(prefix) and hasattr(m, "size")
    }


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _expert_mesh(groups: ParallelGroups):
    """The 1-D mesh of this rank's expert group."""
    if groups.expert_mesh is not None:
        return groups.expert_mesh["expert"]
    from torch.distributed.device_mesh import DeviceMesh

    key = id(groups.expert_group)
    if key not in _meshes:
        _meshes[key] = DeviceMesh.from_group(groups.expert_group, groups.device_type)
    return _meshes[key]


def _view(t: torch.Tensor, expert: bool, groups: ParallelGroups):
    """(t in the single-process layout, a function copying a loaded view back into t or None)."""
    if not expert or groups.expert_size == 1:
        return (t if _is_dtensor(t) else t.detach()), None
    from torch.distributed.tensor import DTensor, Replicate, Shard

    sharded = _is_dtensor(t)  # FSDP-sharded over the expert replicas
    local = t.full_tensor() if sharded else t.detach()
    shape = torch.Size((local.shape[0] * groups.expert_size, *local.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()  # the global tensor, contiguous
    view = DTensor.from_local(local, _expert_mesh(groups), [Shard(0)], shape=shape, stride=stride)
    if not sharded:
        return view, None

    def write_back() -> None:
        whole = DTensor.from_local(local, t.device_mesh, [Replicate()] * t.device_mesh.ndim)
        t.to_local().copy_(whole.redistribute(t.device_mesh, t.placements).to_local())

    return view, write_back


def global_shapes(model: nn.Module, groups: ParallelGroups) -> dict[str, torch.Tensor]:
    """The model's state dict in the single-process layout as meta tensors (shapes only, no
    communication): what a checkpoint of any layout must hold to fit this model."""
    experts = expert_param_names(model) if groups.expert_size > 1 else set()
    out = {}
    for name, t in model.state_dict().items():
        shape = tuple(t.shape)
        if name in experts:
            shape = (shape[0] * groups.expert_size, *shape[1:])
        out[name] = torch.empty(shape, dtype=t.dtype, device="meta")
    return out


def _views(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    groups: ParallelGroups,
    optim_keys: set[str] | None = None,
) -> tuple[dict[str, torch.Tensor], list[Callable[[], None]]]:
    """The flat DCP state dict of model (and optimizer); with ``optim_keys`` (loading), missing
    optimizer state that the checkpoint holds is created first, zero, to be loaded into."""
    experts = expert_param_names(model)
    views, write_backs = {}, []
    for name, t in model.state_dict().items():
        views[MODEL_PREFIX + name], wb = _view(t, name in experts, groups)
        write_backs += [wb] if wb else []
    if optimizer is None:
        return views, write_backs
    for name, p in model.named_parameters():
        prefix = f"{OPTIM_PREFIX}{name}."
        if optim_keys is not None:
            _create_state(optimizer, p, prefix, optim_keys)
        for moment, value in optimizer.state.get(p, {}).items():
            if not torch.is_tensor(value):
                continue
            like_param = value.dim() > 0
            views[prefix + moment], wb = _view(value, like_param and name in experts, groups)
            write_backs += [wb] if wb else []
    return views, write_backs


def _create_state(optimizer, p, prefix: str, keys: set[str]) -> None:
    if optimizer.state.get(p):
        return
    names = [k[len(prefix) :] for k in keys if k.startswith(prefix)]
    moments = [m for m in names if "." not in m]
    if moments:  # AdamW's: a scalar step count, and moments shaped like the parameter
        optimizer.state[p] = {
            m: torch.zeros(()) if m == "step" else torch.zeros_like(p.detach()) for m in moments
        }


def save_state(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    groups: ParallelGroups,
) -> None:
    """Write the model's (and optimizer's) tensors into ``directory``: each rank its shard
    (collective on several processes; one process writes everything)."""
    views, _ = _views(model, optimizer, groups)
    writer = dcp.FileSystemWriter(str(directory), sync_files=True)
    with _quiet():
        dcp.save(views, storage_writer=writer, no_dist=not groups.distributed)


def load_state(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    groups: ParallelGroups,
) -> None:
    """Load ``directory`` (written on any layout) into this rank's model and optimizer."""
    keys = set(read_metadata(directory).state_dict_metadata)
    views, write_backs = _views(model, optimizer, groups, optim_keys=keys)
    with _quiet():
        dcp.load(views, storage_reader=_Reader(str(directory)), no_dist=not groups.distributed)
    for write_back in write_backs:
        write_back()


def load_full_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The model weights of ``directory`` as full single-process tensors (read in this process
    alone, whatever layout wrote them)."""
    meta = read_metadata(directory).state_dict_metadata
    full = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.items()
        if k.startswith(MODEL_PREFIX) and hasattr(m, "size")
    }
    with _quiet():
        dcp.load(full, storage_reader=_Reader(str(directory)), no_dist=True)
    return {k[len(MODEL_PREFIX) :]: v for k, v in full.items()}


@contextlib.contextmanager
def _quiet():
    """DCP warns that one process without torch.distributed means a single-process load: that
    is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
