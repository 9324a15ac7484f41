"""Where an adapter's files are: a source (a path or a hub id) -> its weights file, its config and their kind.

Every reader asks this module, so they agree on what an adapter folder is: ``load_adapter``, ``inspect``
and ``plan``, the host cache's key, ``AdapterFolder`` (``loraswap serve --adapters DIR``) and the diffusers
reader. The rules (:func:`locate`):

- a file: ``.safetensors`` is read as safetensors; ``.bin``/``.pt``/``.pth``/``.ckpt`` is a pickle (read only
  when the caller allows pickles); anything else is refused;
- a folder: ``adapter_model.safetensors``, else diffusers' ``pytorch_lora_weights.safetensors``, else its one
  ``*.safetensors`` file, else PEFT's pickled ``adapter_model.bin``; ``adapter_config.json`` beside it is the
  config. A folder is an adapter (:func:`is_adapter_dir`) when it holds the config or one of those named files.
- neither, but shaped like ``owner/name``: a hub id, resolved to its local snapshot through huggingface_hub
  (offline from the HF cache when ``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AdapterFormatError, AdapterNotFoundError

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_FILE_NAMES = (CONFIG_NAME, SAFETENSORS_NAME, DIFFUSERS_WEIGHTS_NAME, PICKLE_NAME)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

SAFETENSORS = "safetensors"
PICKLE = "pickle"


@dataclass(frozen=True)
class Located:
    """An adapter's files: ``weights`` (of ``kind`` ``"safetensors"`` or ``"pickle"``) and its PEFT ``config``
    (None when there is none); ``directory`` when the source was a folder."""

    weights: Path
    config: Path | None
    kind: str
    directory: bool


def resolve_source(source: str | os.PathLike, revision: str | None = None) -> Path:
    """A local path, or the local snapshot of a hub id (offline from the cache when the hub is unreachable)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = os.fspath(source)
    if HUB_ID.match(text):
        return download_from_hub(text, revision=revision)
    raise AdapterNotFoundError(
        f"{text}: no such file or directory; pass a PEFT adapter directory, a .safetensors file or a hub id"
    )


def download_from_hub(
    repo_id: str,
    *,
    filename: str | None = None,
    allow_patterns: Sequence[str] = (CONFIG_NAME, "*.safetensors", PICKLE_NAME),
    **hub_kwargs: Any,
) -> Path:
    """The local copy of ``filename`` in ``repo_id`` (``hf_hub_download``), else of the repo's files matching
    ``allow_patterns`` (``snapshot_download``); ``hub_kwargs`` (revision, subfolder, token, ...) go to huggingface_hub.
    Offline (``HF_HUB_OFFLINE=1``) it reads the local HF cache only."""
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if filename:
            return Path(hf_hub_download(repo_id, filename, **hub_kwargs))
        return Path(snapshot_download(repo_id, allow_patterns=list(allow_patterns), **hub_kwargs))
    except Exception as err:  # huggingface_hub raises a family of HTTP, offline and cache errors
        raise AdapterNotFoundError(
            f"{repo_id}: not a local path and not resolvable as a hub id ({type(err).__name__}: {err}); "
            "download it first, or check the name and HF_HUB_OFFLINE / HF_HOME"
        ) from err


def locate(source: str | os.PathLike, revision: str | None = None) -> Located:
    """The files of the adapter at ``source`` (a path or a hub id), by the rules in the module docstring."""
    return locate_path(resolve_source(source, revision))


def locate_path(path: Path) -> Located:
    """:func:`locate` for a local path."""
    if path.is_file():
        return Located(path, None, file_kind(path), directory=False)
    config = path / CONFIG_NAME
    config = config if config.is_file() else None
    for name in (SAFETENSORS_NAME, DIFFUSERS_WEIGHTS_NAME):
        if (path / name).is_file():
            return Located(path / name, config, SAFETENSORS, directory=True)
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) == 1:
        return Located(candidates[0], config, SAFETENSORS, directory=True)
    if (path / PICKLE_NAME).is_file():
        return Located(path / PICKLE_NAME, config, PICKLE, directory=True)
    raise AdapterNotFoundError(
        f"{path}: holds no single adapter weights file ({SAFETENSORS_NAME}, {DIFFUSERS_WEIGHTS_NAME}, "
        f"one *.safetensors or {PICKLE_NAME}; found {len(candidates)} *.safetensors)"
    )


def file_kind(path: Path) -> str:
    """``"safetensors"`` or ``"pickle"`` by the file's suffix; :class:`AdapterFormatError` for anything else."""
    if path.suffix == ".safetensors":
        return SAFETENSORS
    if path.suffix in PICKLE_SUFFIXES:
        return PICKLE
    raise AdapterFormatError(f"{path}: unknown adapter file type {path.suffix!r}; expected .safetensors or a directory")


def is_adapter_dir(path: Path) -> bool:
    """Whether a folder is one adapter (not a folder of adapters): it holds a config or a named weights file."""
    return any((path / name).is_file() for name in ADAPTER_FILE_NAMES)


def is_peft_dir(source: Any) -> bool:
    """A local adapter folder with a PEFT ``adapter_config.json``: one model's adapter, read by ``load_adapter``."""
    return isinstance(source, (str, os.PathLike)) and (Path(source).expanduser() / CONFIG_NAME).is_file()


def adapter_paths(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Expand folders of adapters into their adapters; an adapter folder, a file or a hub id stays as it is.

    A folder is one adapter when :func:`is_adapter_dir`; otherwise each child that is an adapter folder or a
    ``.safetensors`` file is one adapter.
    """
    expanded: list[str] = []
    for source in paths:
        path = Path(source).expanduser()
        if not path.is_dir() or is_adapter_dir(path):
            expanded.append(os.fspath(source))
            continue
        children = sorted(
            child
            for child in path.iterdir()
            if child.suffix == ".safetensors" or (child.is_dir() and is_adapter_dir(child))
        )
        if not children:
            raise AdapterNotFoundError(
                f"{path}: neither an adapter folder nor a folder of adapters (none found inside)"
            )
        expanded.extend(str(child) for child in children)
    return expanded
