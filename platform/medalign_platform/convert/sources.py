"""Reading released checkpoints safely and lazily, and accounting for every tensor.

:class:`TensorSource` opens a checkpoint folder or file without loading it: safetensors
shards (found through ``model.safetensors.index.json`` or by listing) are read one tensor at
a time with ``safe_open``, so converting a 7B model never holds two copies of it; ``.bin`` /
``.pt`` files are loaded with ``torch.load(weights_only=True)`` (no arbitrary objects) and
memory-mapped where the file allows. Every tensor a converter uses is *taken* exactly once;
:meth:`TensorSource.finish` then fails naming any tensor nobody took, so a key-name slip
can never silently drop weights.

Conversions write into a hidden sibling folder and rename it into place at the end
(:func:`converted_dir`), so a failure never leaves a half-written output.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from ..common.atomic import move_into_place, replaceable
from ..common.errors import MedAlignError

__all__ = ["ConversionError", "MARKER_FILE", "TensorSource", "converted_dir", "write_marker"]

#: Written into every conversion output; a later conversion may replace such a folder.
MARKER_FILE = "medalign_convert.json"


class ConversionError(MedAlignError, ValueError):
    """The source cannot be converted; the message names the file or key and the fix."""


class TensorSource:
    """Lazy, take-once access to the tensors of a checkpoint.

    Args:
        path: a folder (safetensors shards with or without an index json, or ``.bin``
            shards with ``pytorch_model.bin.index.json``) or a single file.
        strip_prefix: a prefix every key carries and that is removed (e.g. DDP's ``module.``);
            applied only when all keys have it.
        unwrap: for ``.bin``/``.pt`` files, the dict key holding the state dict when the file
            is a training checkpoint (e.g. ``"state_dict"``); other entries are ignored.
    """

    def __init__(self, path: str | Path, *, strip_prefix: str | None = None, unwrap: str | None = None):
        self.path = Path(path).expanduser()
        self._where: dict[str, tuple[Path, str]] = {}  # key -> (file, stored key)
        self._loaded: dict[Path, dict[str, torch.Tensor]] = {}  # torch.load'ed files
        self._taken: set[str] = set()
        self._unwrap = unwrap
        for file in self._files():
            for stored in self._file_keys(file):
                self._where[stored] = (file, stored)
        if not self._where:
            raise ConversionError(f"{self.path}: no tensors found")
        if strip_prefix and all(k.startswith(strip_prefix) for k in self._where):
            self._where = {k[len(strip_prefix):]: v for k, v in self._where.items()}

    # ------------------------------------------------------------------ discovery

    def _files(self) -> list[Path]:
        path = self.path
        if path.is_file():
            return [path]
        if not path.is_dir():
            raise ConversionError(f"{path}: no such file or folder")
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = path / index_name
            if index.is_file():
                weight_map = json.loads(index.read_text()).get("weight_map") or {}
                files = sorted({path / name for name in weight_map.values()})
                missing = [f.name for f in files if not f.is_file()]
                if missing:
                    raise ConversionError(f"{index} names shard(s) {missing} that are not in {path}; "
                                          "download every shard the index lists")
                self._index = {k: path / v for k, v in weight_map.items()}
                return files
        self._index = None
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
        if not files:
            raise ConversionError(f"{path}: no *.safetensors or pytorch_model*.bin weights")
        return files

    def _file_keys(self, file: Path) -> list[str]:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as handle:
                keys = list(handle.keys())
        else:
            keys = list(self._torch_load(file))
        index = getattr(self, "_index", None)
        if index is not None:
            # The index and the shard headers must agree: a key in a shard the index does
            # not list is ignored by transformers, which is exactly a silent weight loss.
            unlisted = [k for k in keys if index.get(k) != file]
            if unlisted:
                raise ConversionError(f"{file.name} holds {unlisted[:5]} which the index json maps elsewhere or not "
                                      "at all; the shards and the index do not match")
        return keys

    def _torch_load(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._loaded:
            try:
                data = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # old (non-zip) serialisation cannot be memory-mapped
                try:
                    data = torch.load(file, map_location="cpu", weights_only=True)
                except Exception as error:  # noqa: BLE001 - re-raised with the fix
                    raise self._unsafe(file, error) from error
            except Exception as error:  # noqa: BLE001
                raise self._unsafe(file, error) from error
            if self._unwrap and isinstance(data, dict) and isinstance(data.get(self._unwrap), dict):
                data = data[self._unwrap]
            if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
                kinds = sorted({type(v).__name__ for v in (data.values() if isinstance(data, dict) else [data])})
                raise ConversionError(f"{file}: expected a mapping of names to tensors"
                                      f"{' under ' + repr(self._unwrap) if self._unwrap else ''}, found {kinds}")
            self._loaded[file] = data
        return self._loaded[file]

    @staticmethod
    def _unsafe(file: Path, error: Exception) -> ConversionError:
        return ConversionError(
            f"{file} cannot be read with torch.load(weights_only=True): {str(error).splitlines()[0]}. It holds "
            "Python objects besides tensors, which this platform never unpickles. Re-save only its state dict "
            "(tensors) in a trusted environment, or use the release's .safetensors files.")

    # ------------------------------------------------------------------ access

    def keys(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        file, stored = self._where[key]
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as handle:
                return tuple(handle.get_slice(stored).get_shape())
        return tuple(self._torch_load(file)[stored].shape)

    def take(self, key: str) -> torch.Tensor:
        """Reads one tensor and marks it consumed (taking a key twice is an error)."""
        if key not in self._where:
            raise ConversionError(f"{self.path}: tensor {key!r} is missing from the source checkpoint")
        if key in self._taken:
            raise ConversionError(f"converter bug: tensor {key!r} taken twice")
        self._taken.add(key)
        file, stored = self._where[key]
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as handle:
                return handle.get_tensor(stored)
        return self._torch_load(file)[stored]

    def drop(self, key: str) -> None:
        """Marks a tensor as deliberately not carried over (it still counts as accounted for)."""
        if key not in self._where:
            raise ConversionError(f"converter bug: dropping unknown tensor {key!r}")
        self._taken.add(key)

    def untaken(self) -> list[str]:
        return sorted(set(self._where) - self._taken)

    def finish(self) -> None:
        """Raises naming every tensor no rule consumed."""
        left = self.untaken()
        if left:
            shown = ", ".join(left[:12]) + (f" ... ({len(left)} in all)" if len(left) > 12 else "")
            raise ConversionError(f"{self.path}: {len(left)} source tensor(s) were not converted: {shown}. The "
                                  "checkpoint has parts this converter does not know; nothing was written.")


@contextlib.contextmanager
def converted_dir(out_dir: str | Path, kind: str) -> Iterator[Path]:
    """Yields a hidden temporary folder beside ``out_dir``; moves it into place on success.

    An existing ``out_dir`` is replaced only if it is empty or an earlier conversion of the
    same ``kind`` wrote it (its :data:`MARKER_FILE`); anything else is refused.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and not replaceable(out_dir, MARKER_FILE, kind):
        raise ConversionError(f"{out_dir} exists and was not written by `medalign convert {kind}`; "
                              "choose a new output folder (nothing is overwritten)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:8]}.partial"
    tmp.mkdir()
    try:
        yield tmp
        move_into_place(tmp, out_dir)
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


def write_marker(folder: Path, kind: str, record: dict) -> None:
    (folder / MARKER_FILE).write_text(json.dumps({"name": kind, **record}, indent=2, sort_keys=True))
