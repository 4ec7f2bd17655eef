"""A qvl checkpoint folder: ``model.safetensors`` (the whole model), ``preset.json`` (the
architecture it was built with), ``meta.json`` (stage, step, resolution) and, for resuming,
``state.pt`` (``save_checkpoint`` writes a run's, ``resume`` reads it back). The preset
travels with the weights, so ``qvl generate``, ``qvl train --init`` (and evaluation) need no
``--preset``; one given that builds another architecture is an error.

An FSDP run's checkpoint is sharded (``torch.distributed.checkpoint``): each rank writes its own
shards of the weights and AdamW state into ``shards-STEP-ID/``, no rank gathers the model, and
``state.pt`` (data positions, RNG, the folder's name) is written last: the commit point, so a run
killed while writing keeps the previous checkpoint. It resumes on any number of processes (DCP
reshards; one process loads it into an unsharded model). ``model.safetensors`` is written, tensor
by tensor, at the run's end; ``qvl convert consolidate`` writes it from the shards of a run that
stopped before (``consolidate``).

Every file is decoded here into a typed, ranged structure before anything is built from it:
``meta.json`` into ``CheckpointMeta``, a ``.safetensors`` header into ``TensorEntry``s whose
offsets are checked against the file's size (a truncated file or a header that claims 4 TB is
one error naming the file, never a read past its end).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import pickle
import shutil
import struct
import warnings
from pathlib import Path
from typing import Annotated

import msgspec
import torch
import torch.distributed as dist

from qvl.boundary import Count, decode_json, read_json_file
from qvl.common import storage
from qvl.errors import QvlError, RecordError
from qvl.trainer import parallel
from qvl.trainer.model import QwenVL
from qvl.trainer.preset import ModelConfig, Name, Resolution, load_preset

MAX_HEADER_BYTES = 16 << 20  # a safetensors header: Qwen-VL-Chat's largest is ~100 KB
MAX_META_BYTES = 1 << 20
MAX_DCP_INDEX_BYTES = 256 << 20  # a DCP .metadata: ~200 bytes a chunk, a 9B model's on 64 ranks is ~30 MB

# safetensors dtype -> bytes per element (the format's whole list)
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


class CheckpointError(QvlError):
    pass


class CheckpointMeta(msgspec.Struct):
    """``meta.json``: what a checkpoint says about itself (other keys are kept by whoever wrote them)."""

    resolution: Resolution
    stage: Annotated[int, msgspec.Meta(ge=0, le=3)] = 0
    step: Count = 0
    preset: Name | None = None
    global_batch: Count | None = None  # rows per optimiser step (micro-batch x accumulation x ranks)


class TensorEntry(msgspec.Struct, forbid_unknown_fields=True):
    """One tensor of a safetensors header: dtype, shape, [begin, end) in the data after the header."""

    dtype: str
    shape: Annotated[list[Count], msgspec.Meta(max_length=16)]
    data_offsets: Annotated[list[Count], msgspec.Meta(min_length=2, max_length=2)]


def read_safetensors_header(path: Path, error=CheckpointError) -> dict[str, TensorEntry]:
    """The tensors of a ``.safetensors`` file from its header alone (the first 8 bytes give the
    header's length, refused above ``MAX_HEADER_BYTES`` before it is read), each checked to lie
    inside the file: in order, without gaps or overlaps, ending where the file ends."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise error(f"{path}: truncated ({size} bytes; a safetensors file starts with an 8-byte header length)")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES or length > size - 8:
                raise error(f"{path}: not a safetensors file, or truncated (its header claims {length:,} bytes; "
                            f"the file holds {size:,}, and qvl reads headers up to {MAX_HEADER_BYTES:,})")
            header = f.read(length)
    except OSError as e:
        raise error(f"{path}: unreadable ({e.strerror or e})") from None
    try:
        raw = decode_json(header, dict[str, msgspec.Raw])
        raw.pop("__metadata__", None)
        entries = {key: decode_json(value, TensorEntry) for key, value in raw.items()}
    except RecordError as e:
        raise error(f"{path}: a damaged safetensors header ({e})") from None
    data_bytes, end = size - 8 - length, 0
    for key, entry in sorted(entries.items(), key=lambda item: tuple(item[1].data_offsets)):
        begin, stop = entry.data_offsets
        if entry.dtype not in DTYPE_BYTES:
            raise error(f"{path}: tensor {key}: unknown dtype {entry.dtype[:20]!r}")
        if begin != end or stop - begin != math.prod(entry.shape) * DTYPE_BYTES[entry.dtype]:
            raise error(f"{path}: tensor {key}: its bytes [{begin:,}, {stop:,}) do not fit its shape "
                        f"{tuple(entry.shape)} of {entry.dtype} after the previous tensor (ends at {end:,})")
        end = stop
    if end != data_bytes:
        raise error(f"{path}: truncated or padded: its header describes {end:,} bytes of tensors, "
                    f"the file holds {data_bytes:,}")
    return entries


def error_clause(e: BaseException) -> str:
    """An exception as a short clause for a one-line error: torch's weights-only refusal without
    its advice to load the file with ``weights_only=False`` (bad advice for a damaged or hostile
    file), the first line of anything else."""
    failures = getattr(e, "failures", None)  # DCP's CheckpointException: each rank's error
    if isinstance(failures, dict) and failures:
        e = getattr(next(iter(failures.values())), "exc", e)
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    elif "weights_only" in text:
        text = ""
    text = " ".join(text.strip().split("\n")[0].split())[:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def load_state(path: Path) -> dict:
    """``state.pt``, read weights-only; anything else is one error naming the file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        with warnings.catch_warnings():  # torch's note on a pickle protocol it did not write: the error says it
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise CheckpointError(f"{path}: damaged, or not written by qvl ({error_clause(e)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: damaged, or not written by qvl (not a dict)")
    return state


def _dcp_globals() -> dict[tuple[str, str], object]:
    """Exactly the globals a DCP ``.metadata`` written by torch refers to (found by logging the
    unpickling of the ones qvl's runs write): DCP's own records, ``torch.Size``, dtypes, layouts
    and a path (the checkpoint id)."""
    import pathlib

    from torch.distributed.checkpoint import filesystem, metadata

    allowed = {("torch.distributed.checkpoint.metadata", name): getattr(metadata, name)
               for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                            "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")}
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed |= {("torch", name): value for name, value in vars(torch).items()
                if isinstance(value, (torch.dtype, torch.layout, torch.memory_format))}
    allowed |= {("pathlib", name): getattr(pathlib, name) for name in ("PosixPath", "PurePosixPath", "Path")}
    return allowed


class _IndexUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path, self.allowed = path, _dcp_globals()

    def find_class(self, module: str, name: str):
        if (module, name) not in self.allowed:
            raise CheckpointError(f"{self.path}: not a DCP index qvl reads: it refers to {module[:80]}.{name[:80]} "
                                  "(a DCP .metadata holds only torch's checkpoint records); refusing to load it")
        return self.allowed[(module, name)]


def read_dcp_index(folder: Path):
    """A DCP folder's ``.metadata`` (a pickle) through an unpickler that builds only the
    classes such a file holds: a crafted file cannot run code. Bounded in size."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    path = folder / ".metadata"
    try:
        size = path.stat().st_size
        if size > MAX_DCP_INDEX_BYTES:
            raise CheckpointError(f"{path}: {size:,} bytes; qvl reads DCP indexes up to {MAX_DCP_INDEX_BYTES:,}")
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (the shards' index)") from None
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable ({e.strerror or e})") from None
    try:
        index = _IndexUnpickler(io.BytesIO(data), path).load()
    except CheckpointError:
        raise
    except Exception as e:  # pickle raises many types for a damaged file
        raise CheckpointError(f"{path}: damaged, or not a DCP index ({error_clause(e)})") from None
    if not isinstance(index, Metadata) or not isinstance(getattr(index, "storage_data", None), dict):
        raise CheckpointError(f"{path}: damaged, or not a DCP index (holds a {type(index).__name__})")
    if getattr(index, "storage_meta", None) is None:
        index.storage_meta = StorageMeta()
    return index


def dcp_reader(folder: Path, index):
    """A DCP ``FileSystemReader`` of ``folder`` that hands DCP ``index`` (``read_dcp_index``'s,
    read once by the caller): every DCP read of qvl's goes through it, and consolidating a
    model tensor by tensor does not unpickle the index once a tensor."""
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            index.storage_meta.load_id = self.load_id
            return index

    return SafeReader(str(folder))


@contextlib.contextmanager
def _quiet_single_process():
    """DCP read on purpose without a process group: its warning that it assumes so is noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def read_meta(folder: Path) -> CheckpointMeta:
    path = folder / "meta.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a checkpoint folder (no meta.json; give a run's checkpoint/ folder "
                              "or the --out of qvl convert)")
    return read_json_file(path, CheckpointMeta, MAX_META_BYTES, CheckpointError)


def read_preset(folder: str | Path, explicit: str | None = None) -> ModelConfig:
    """The checkpoint's preset; ``explicit`` (a name or file) may replace it only when it
    builds the same architecture (its stage table may differ)."""
    folder = Path(folder)
    carried = folder / "preset.json"
    chosen = load_preset(explicit) if explicit else None
    if not carried.is_file():  # checkpoints written before presets travelled with them
        if chosen is None:
            meta = read_meta(folder)
            try:
                return load_preset(meta.preset or "tiny")
            except QvlError:
                raise CheckpointError(f"{folder}: no preset.json; give the preset it was trained with "
                                      "(--preset)") from None
        return chosen
    own = load_preset(str(carried))
    if chosen is not None and chosen.architecture() != own.architecture():
        raise CheckpointError(f"--preset {explicit}: builds another model than the checkpoint {folder} holds "
                              f"(its preset: {own.name}); leave --preset out to use the checkpoint's")
    return chosen or own


FLOATING = {"F16", "BF16", "F32", "F64"}  # a model's weights; anything else is not a checkpoint qvl wrote
TORCH_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
SAFETENSORS_DTYPES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
SHARDS = "shards-"  # an FSDP run's sharded weights and optimiser state: shards-STEP-ID/ (DCP)


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n:,} more" if len(items) > n else "")


def weights_path(folder: str | Path) -> Path:
    """``folder``'s ``model.safetensors``; a folder with only an FSDP run's shards says how to
    consolidate them."""
    folder = Path(folder)
    path = folder / "model.safetensors"
    if not path.is_file() and any(folder.glob(f"{SHARDS}*")):
        raise CheckpointError(f"{folder}: holds sharded weights only (an FSDP run stopped before its end); "
                              f"qvl convert consolidate {folder} writes its model.safetensors")
    return path


class SafetensorsReader:
    """The tensors of a checked ``.safetensors`` file, each read from disk when asked (no memory
    map: pages of a whole mapped file would count against the process), float ones only."""

    def __init__(self, path: Path):
        self.path = path
        self.entries = read_safetensors_header(path)
        odd = sorted(f"{key} ({entry.dtype})" for key, entry in self.entries.items() if entry.dtype not in FLOATING)
        if odd:
            raise CheckpointError(f"{path}: tensors that are not floating point ({', '.join(sorted(FLOATING))}): "
                                  f"{_few(odd)}")
        with open(path, "rb") as f:
            self.data_start = 8 + struct.unpack("<Q", f.read(8))[0]

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        tensor = torch.empty(entry.shape, dtype=TORCH_DTYPES[entry.dtype])
        with open(self.path, "rb") as f:
            f.seek(self.data_start + entry.data_offsets[0])
            f.readinto(tensor.view(-1).view(torch.uint8).numpy())
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{self.path}: tensor {name} holds NaN or infinite values; a model cannot run on it")
        return tensor


class Weights:
    """Several sources of tensors as one: (``prefix``, a mapping) pairs, a name found in the
    first whose keys hold it without its prefix, read when asked."""

    def __init__(self, *sources: tuple[str, object]):
        self.sources = sources

    def _source(self, name: str):
        return next(((prefix, source) for prefix, source in self.sources
                     if name.startswith(prefix) and name[len(prefix):] in source), (None, None))

    def __contains__(self, name: str) -> bool:
        return self._source(name)[1] is not None

    def __getitem__(self, name: str) -> torch.Tensor:
        prefix, source = self._source(name)
        if source is None:
            raise KeyError(name)
        return source[name[len(prefix):]]


def llm_folder_weights(folder: str | Path) -> list[tuple[str, SafetensorsReader]]:
    """A Hugging Face LLM folder's safetensors files as the ``llm.`` part of a model's weights."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"--llm {folder}: no .safetensors files (a sharded build reads only safetensors)")
    return [("llm.", SafetensorsReader(path)) for path in files]


def check_names(model: torch.nn.Module, entries: dict[str, TensorEntry], path: Path, what: str,
                shapes: dict[str, tuple] | None = None) -> None:
    """The file holds the model's tensors (tied ones once), of its shapes (``shapes``: the ones
    the file should have where they differ from the model's, e.g. before a resize)."""
    own = model.state_dict(keep_vars=True)
    expected = {key: tuple(t.shape) for key, t in own.items()} | (shapes or {})
    wrong = sorted(f"{key} {tuple(entry.shape)} (the model's {expected[key]})"
                   for key, entry in entries.items() if key in own and tuple(entry.shape) != expected[key])
    stored = {id(own[key]) for key in entries if key in own}
    missing = sorted(key for key in own if key not in entries and id(own[key]) not in stored)  # tied: saved once
    unexpected = sorted(key for key in entries if key not in own)
    for problem, keys in (("shapes that differ", wrong), ("missing tensors", missing),
                          ("tensors the model does not have", unexpected)):
        if keys:
            raise CheckpointError(f"{path}: not weights of {what}: {problem}: {_few(keys)}")


def load_weights(model: QwenVL, path: Path, what: str) -> None:
    """``path`` into ``model``; a damaged file, one of another architecture (keys or shapes that
    differ, named a few at a time), weights that are not floating point or not finite, is one
    error naming the file and the tensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    check_names(model, SafetensorsReader(path).entries, path, what)
    try:
        load_model(model, str(path))
    except (OSError, RuntimeError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"{path}: cannot load into {what} ({' '.join(str(e).split())[:300]})") from None
    for key, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: tensor {key} holds NaN or infinite values; a model cannot run on it")


def load_checkpoint(folder: str | Path, explicit_preset: str | None = None):
    """(model in eval mode, preset, tokenizer, meta) of a checkpoint folder, on the CPU;
    ``meta`` is ``meta.json``'s checked fields as a dict."""
    from qvl.formats.tokenizers import IMG_PAD, load_tokenizer

    folder = Path(folder)
    meta = read_meta(folder)
    preset = read_preset(folder, explicit_preset)
    path = weights_path(folder)
    tok = load_tokenizer(preset.tokenizer)
    model = QwenVL(preset, tok.vocab_size, tok.special(IMG_PAD), meta.resolution)
    load_weights(model, path, f"preset {preset.name}")
    return model.eval(), preset, tok, msgspec.structs.asdict(meta)


def write_safetensors(path: Path, tensors: list[tuple[str, tuple, torch.dtype]], produce, write: bool) -> None:
    """A ``.safetensors`` file written one tensor at a time: the header from names, shapes and
    dtypes, then ``produce(name)`` for each in order (called on every rank: it may be a
    collective; only where ``write`` is the file written)."""
    offsets, end = {}, 0
    for name, shape, dtype in tensors:
        size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        offsets[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [end, end + size]}
        end += size
    header = json.dumps(offsets, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with contextlib.ExitStack() as stack:
        f = None
        if write:
            tmp = stack.enter_context(storage.atomic_path(path))
            f = stack.enter_context(open(tmp, "wb"))
            f.write(struct.pack("<Q", len(header)) + header)
        for name, _, _ in tensors:
            tensor = produce(name)
            if f is not None:
                f.write(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
            del tensor


def saved_names(model: torch.nn.Module) -> list[str]:
    """The model's tensors as ``model.safetensors`` holds them: tied ones once, under the name
    safetensors' ``save_model`` keeps (the first in sorted order)."""
    aliases: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        aliases.setdefault(id(tensor), []).append(name)
    return [min(group) for group in aliases.values()]


def write_consolidated(path: Path, model: torch.nn.Module, main: bool) -> None:
    """The whole weights of a sharded model into ``path`` (rank 0 writes), gathered one tensor
    at a time (a collective: every rank calls it); the optimiser stays sharded."""
    state = model.state_dict(keep_vars=True)
    names = saved_names(model)

    def produce(name):
        tensor = state[name]
        return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor

    write_safetensors(path, [(n, tuple(state[n].shape), state[n].dtype) for n in names], produce, main)


def _dcp_index_checked(folder: Path):
    """The DCP index of ``folder``, once every file it names is there and long enough: a missing
    or truncated shard is one error naming it, not a torch traceback."""
    index = read_dcp_index(folder)
    needed: dict[str, int] = {}
    for info in index.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (a shard of this checkpoint)")
        if path.stat().st_size < size:
            raise CheckpointError(f"{path}: truncated ({path.stat().st_size:,} bytes, its index needs {size:,})")
    return index


def consolidate(folder: str | Path, out: str | Path | None = None) -> dict:
    """``model.safetensors`` of an FSDP run's checkpoint folder from its shards, in one process,
    one tensor at a time (the optimiser state is not read): beside them, or with ``out`` a new
    checkpoint folder of whole weights (its ``preset.json`` and ``meta.json`` the run's)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from qvl.formats.tokenizers import IMG_PAD, load_tokenizer

    folder = Path(folder)
    target = folder if out is None or Path(out).resolve() == folder.resolve() else Path(out)
    if target != folder:
        try:  # a new folder, or one a consolidation wrote: never a file, never others' files
            storage.claim(target, "consolidated checkpoint")
        except storage.OutputError as e:
            raise CheckpointError(str(e)) from None
    meta = read_meta(folder)
    preset = read_preset(folder)
    tok = load_tokenizer(preset.tokenizer)
    with torch.device("meta"):
        keep = set(saved_names(QwenVL(preset, tok.vocab_size, tok.special(IMG_PAD), meta.resolution)))
    whole = f"{folder}: not a sharded checkpoint (its model.safetensors is the whole model)"
    if not (folder / "state.pt").is_file() and (folder / "model.safetensors").is_file():
        raise CheckpointError(whole)
    name = load_state(folder / "state.pt").get("shards")
    if name is None:
        raise CheckpointError(whole)
    shards = _shards_folder(folder, name)
    index = _dcp_index_checked(shards)
    items = [(key, tuple(m.size), m.properties.dtype)
             for key, m in index.state_dict_metadata.items()
             if key[len("model."):] in keep and isinstance(m, TensorStorageMetadata)]

    layout = {key: (shape, dtype) for key, shape, dtype in items}
    missing = sorted(keep - {key[len("model."):] for key in layout})
    if missing:
        raise CheckpointError(f"{shards}: not weights of preset {preset.name}: missing tensors: {_few(missing)}")

    def produce(key):
        tensor = torch.empty(layout[key][0], dtype=layout[key][1])
        try:
            with _quiet_single_process():
                dcp.load({key: tensor}, storage_reader=dcp_reader(shards, index), no_dist=True)
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as e:  # DCP wraps a damaged shard's error in its own
            files = sorted({info.relative_path for index_key, info in index.storage_data.items()
                            if index_key.fqn == key})
            raise CheckpointError(f"{', '.join(str(shards / f) for f in files) or shards}: damaged "
                                  f"(tensor {key} cannot be read: {error_clause(e)})") from None
        return tensor

    write_safetensors(target / "model.safetensors", [(k[len("model."):], s, d) for k, s, d in items],
                      lambda n: produce("model." + n), True)
    if target != folder:
        for name in ("preset.json", "meta.json"):
            with storage.atomic_path(target / name) as tmp:
                shutil.copyfile(folder / name, tmp)
    return {"tensors": len(items), "parameters": sum(math.prod(s) for _, s, _ in items),
            "out": str(target / "model.safetensors")}


def save_checkpoint(folder: Path, model: QwenVL, optimizer, loader_state: dict, step: int, fsdp: bool, world: int,
                    main: bool, preset: ModelConfig, meta: dict, consolidate: bool = True) -> None:
    """A training run's checkpoint: weights, optimiser, every rank's data position and the
    torch RNG (``state.pt``, for resuming), ``preset.json`` and ``meta.json``. A collective:
    every rank calls it. Under FSDP every rank writes its shards (``_save_sharded``) and the
    whole ``model.safetensors`` only when ``consolidate``; otherwise rank 0 writes it all."""
    from safetensors.torch import save_model

    loaders = [None] * world
    if world > 1:
        dist.all_gather_object(loaders, loader_state)
    else:
        loaders = [loader_state]
    if fsdp:
        _save_sharded(folder, model, optimizer, loaders, step, main, consolidate)
    elif main:
        folder.mkdir(parents=True, exist_ok=True)
        with storage.atomic_path(folder / "model.safetensors") as tmp:
            save_model(model, str(tmp))
        with storage.atomic_path(folder / "state.pt") as tmp:
            torch.save({"optimizer": optimizer.state_dict(), "loader": loaders, "step": step,
                        "torch_rng": torch.get_rng_state()}, tmp)
        _remove_shards(folder, keep=None)  # of a sharded run resumed here, or a save killed while writing
    if main:
        storage.write_json(folder / "preset.json", preset.to_dict())
        storage.write_json(folder / "meta.json", meta)


def _save_sharded(folder: Path, model, optimizer, loaders: list, step: int, main: bool, consolidate: bool) -> None:
    """Each rank's shards into a new ``shards-STEP-ID/`` (DCP), then ``state.pt`` naming it
    (the commit), then the previous checkpoint's files removed: its shards, or the whole
    ``model.safetensors`` of an earlier step (a folder never holds weights older than its shards).
    A save killed before the commit leaves the previous checkpoint whole."""
    import time

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    shared = [f"{SHARDS}{step:09d}-{time.time_ns():x}"]
    dist.broadcast_object_list(shared, src=0)
    name = shared[0]
    if main:
        folder.mkdir(parents=True, exist_ok=True)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    try:
        dcp.save({"model": model_state, "optim": optimizer_state}, checkpoint_id=str(folder / name))
    except BaseException:  # every rank raises (DCP gathers each rank's result): its partial shards go
        if main:
            shutil.rmtree(folder / name, ignore_errors=True)
        raise
    dist.barrier()
    if main:
        with storage.atomic_path(folder / "state.pt") as tmp:
            torch.save({"shards": name, "loader": loaders, "step": step, "torch_rng": torch.get_rng_state()}, tmp)
        (folder / "model.safetensors").unlink(missing_ok=True)
        _remove_shards(folder, keep=name)
    if consolidate:
        write_consolidated(folder / "model.safetensors", model, main)


def _shards_folder(folder: Path, name) -> Path:
    """The shards folder ``state.pt`` names: a ``shards-*`` folder beside it, nothing else."""
    if not isinstance(name, str) or not name.startswith(SHARDS) or "/" in name or "\\" in name or ".." in name:
        raise CheckpointError(f"{folder / 'state.pt'}: damaged, or not written by qvl (names shards {str(name)[:80]!r})")
    return folder / name


def _remove_shards(folder: Path, keep: str | None) -> None:
    for old in folder.glob(f"{SHARDS}*"):
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def resume(folder: Path, model: QwenVL, optimizer, loader, fsdp: bool, main: bool) -> int:
    """Weights, optimiser, the data position and the torch RNG from ``save_checkpoint``'s
    folder; its step. The loader is given every rank's position (the run may have had another
    world size); sharded weights load on any number of processes, sharded or not. Anything
    damaged is one CheckpointError naming the folder (a missing or truncated shard: the file)."""
    from safetensors.torch import load_file, load_model
    from torch.distributed.checkpoint.api import CheckpointException

    state = load_state(folder / "state.pt")
    try:
        if "shards" in state:
            _load_sharded(_shards_folder(folder, state["shards"]), model, optimizer)
        elif fsdp:
            weights = load_file(str(folder / "model.safetensors")) if main else {}
            parallel.load_full_state(model, optimizer, weights,
                                     parallel.named_optimizer_state(model, optimizer, state["optimizer"]) if main else {})
        else:
            load_model(model, str(folder / "model.safetensors"))
            optimizer.load_state_dict(state["optimizer"])
        loader.restore(state["loader"])
        step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # torch/safetensors/DCP raise many types for a damaged file
        raise CheckpointError(f"{folder}: cannot resume from this checkpoint ({error_clause(e)})") from None
    return step


def _load_sharded(shards: Path, model, optimizer) -> None:
    """DCP shards into this run's model and optimiser, resharded to however they are spread now."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    index = _dcp_index_checked(shards)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optimizer_state}
    with _quiet_single_process():
        dcp.load(state, storage_reader=dcp_reader(shards, index), no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
