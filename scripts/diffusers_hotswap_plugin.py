"""pytest plugin for ``scripts/diffusers_hotswap_suite.py``: diffusers' own hotswap tests, on CPU, against
diffusers' implementation or loraswap's.

- ``LORASWAP_DIFFUSERS_IMPL=loraswap``: :func:`loraswap.diffusers.patch` routes diffusers'
  ``enable_lora_hotswap`` (models and pipelines) to loraswap before any test module is imported;
  after collection the plugin checks that it still is, and stops the run otherwise.
  ``LORASWAP_DIFFUSERS_IMPL=diffusers`` changes nothing of diffusers'.
- The tests are marked ``require_torch_accelerator`` (a ``skipif`` whose reason is
  ``test requires accelerator+PyTorch``); that marker, and only that one, is taken off every
  collected test. ``slow`` tests run because the suite script sets ``RUN_SLOW=1``.
- ``TestLoraHotSwappingForPipeline`` loads the hub repo ``hf-internal-testing/tiny-sd-pipe``, which is
  not reachable offline: ``DiffusionPipeline.from_pretrained`` of that id loads a local tiny SD pipeline
  of the same layout instead (UNet block channels (32, 64), CLIP hidden 32, written once per session
  by :func:`loraswap.testing.synthetic_diffusers.tiny_sd_pipeline`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

IMPL_VARIABLE = "LORASWAP_DIFFUSERS_IMPL"
ACCELERATOR_REASON = "test requires accelerator+PyTorch"
TINY_SD_PIPE = "hf-internal-testing/tiny-sd-pipe"


def _implementation() -> str:
    impl = os.environ.get(IMPL_VARIABLE, "diffusers")
    if impl not in ("diffusers", "loraswap"):
        raise pytest.UsageError(f"{IMPL_VARIABLE}={impl!r}; use 'diffusers' or 'loraswap'")
    return impl


def _serve_tiny_sd_pipe_locally() -> None:
    from diffusers import DiffusionPipeline

    from loraswap.testing.synthetic_diffusers import tiny_sd_pipeline

    local = Path(tempfile.mkdtemp(prefix="tiny-sd-pipe-"))
    tiny_sd_pipeline(channels=32, text_hidden=32).save_pretrained(local)
    hub_loader = DiffusionPipeline.from_pretrained.__func__

    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        if str(pretrained_model_name_or_path) == TINY_SD_PIPE:
            pretrained_model_name_or_path = local
        return hub_loader(cls, pretrained_model_name_or_path, *args, **kwargs)

    DiffusionPipeline.from_pretrained = classmethod(from_pretrained)


def pytest_configure(config: pytest.Config) -> None:
    _serve_tiny_sd_pipe_locally()
    if _implementation() == "loraswap":
        import loraswap.diffusers

        loraswap.diffusers.patch()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for node in item.listchain():
            node.own_markers[:] = [
                mark for mark in node.own_markers
                if not (mark.name == "skipif" and mark.kwargs.get("reason") == ACCELERATOR_REASON)
            ]  # fmt: skip


def pytest_collection_finish(session: pytest.Session) -> None:
    import loraswap.diffusers

    if loraswap.diffusers.is_patched() != (_implementation() == "loraswap"):
        raise pytest.UsageError(f"diffusers' enable_lora_hotswap is not routed as {IMPL_VARIABLE} asks")


def pytest_report_header(config: pytest.Config) -> str:
    return f"diffusers hotswap implementation under test: {_implementation()}"
