"""A folder of adapters, by name: what ``loraswap serve --adapters DIR`` exposes.

Each entry of the folder is an adapter: an adapter directory (:func:`loraswap.formats.locate.is_adapter_dir`, the
test ``inspect`` and ``load_adapter`` use), named by the directory's name, or a ``.safetensors`` file, named by
its file name without ``.safetensors``. The folder is read when
asked (``ids``, ``resolve``), so adapters added while a server runs are served without a restart.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import AdapterNotFoundError
from .formats.locate import SAFETENSORS_NAME, is_adapter_dir

_SUFFIX = ".safetensors"


class AdapterFolder:
    """``resolve`` for :class:`~loraswap.AdapterPool`: adapter name -> its path in ``directory``.

    ``AdapterPool(slots, resolve=AdapterFolder("adapters/"))`` serves ``adapters/style-a/`` (a PEFT
    directory) as ``"style-a"`` and ``adapters/char-b.safetensors`` as ``"char-b"``.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory).expanduser()
        if not self.directory.is_dir():
            raise AdapterNotFoundError(f"{self.directory}: no such folder; give the folder that holds the adapters")

    def ids(self) -> list[str]:
        """The names of every adapter in the folder, sorted."""
        names = set()
        for entry in self.directory.iterdir():
            if entry.is_dir() and is_adapter_dir(entry):
                names.add(entry.name)
            elif entry.is_file() and entry.name.endswith(_SUFFIX):
                names.add(entry.name[: -len(_SUFFIX)])
        return sorted(names)

    def __call__(self, adapter_id: str) -> Path:
        """The path of adapter ``adapter_id``, or :class:`AdapterNotFoundError` naming the folder."""
        if not isinstance(adapter_id, str) or not _is_plain_name(adapter_id):
            raise AdapterNotFoundError(
                f"adapter id {adapter_id!r} is not a name in {self.directory}; "
                "give a folder or file name without a path (see AdapterFolder.ids())"
            )
        folder = self.directory / adapter_id
        if folder.is_dir() and is_adapter_dir(folder):
            return folder
        file = self.directory / (adapter_id + _SUFFIX)
        if file.is_file():
            return file
        available = self.ids()
        raise AdapterNotFoundError(
            f"no adapter {adapter_id!r} in {self.directory} (neither {adapter_id}/ with {SAFETENSORS_NAME} nor "
            f"{adapter_id}{_SUFFIX}); it holds {len(available)} adapter(s), e.g. {available[:5]}"
        )

    def __repr__(self) -> str:
        return f"AdapterFolder({str(self.directory)!r})"


def _is_plain_name(name: str) -> bool:
    """One path component: no separator, not ``.``/``..``, so an id from a request cannot leave the folder."""
    return bool(name) and name not in (".", "..") and os.sep not in name and (os.altsep is None or os.altsep not in name)
