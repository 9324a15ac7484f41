"""What a replica serves for a diffusers pipeline folder: per-prompt LoRAs in one pipeline call.

Requests that share the call's settings (size, steps, guidance) are answered by one pipeline call:
prompt ``i`` on its own adapter at its own ``lora_scale`` (an :class:`AdapterPool` row
``{adapter: lora_scale}``), in every component, text encoders included. Image ``j`` of a request
with ``seed`` uses a CPU ``torch.Generator`` seeded ``seed + j``.
"""

from __future__ import annotations

import base64
import io
import os
import threading
from collections.abc import Mapping, Sequence

import torch

from ..errors import HotswapError
from ..pool import AdapterPool, pool_batches
from .openai import ImageRequest


class UnservedSizeError(HotswapError, ValueError):
    """An image size the server did not compile at warm-up."""

    param = "size"


def image_generators(seed: int | None, count: int) -> list[torch.Generator]:
    """One CPU generator per image: ``seed + j`` for image ``j`` (a random base seed when ``seed`` is None)."""
    base = int(torch.randint(0, 2**31 - 1, ())) if seed is None else seed
    return [torch.Generator().manual_seed(base + index) for index in range(count)]


def call_settings(request: ImageRequest) -> tuple:
    """What must be equal for two requests to share one pipeline call."""
    return (request.height_width(), request.num_inference_steps, request.guidance_scale)


def png_b64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class ImageEngine:
    """A diffusers pipeline with loraswap slots in every component, its denoiser compiled once."""

    def __init__(
        self,
        folder: str | os.PathLike,
        adapters: Mapping[str, str],
        *,
        slots: int = 4,
        sizes: Sequence[str] = ("64x64",),
        backend: str = "inductor",
    ) -> None:
        import loraswap
        from diffusers import DiffusionPipeline

        self.adapters = dict(adapters)
        self.sizes = tuple(sizes)
        self.pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
        self.pipe.set_progress_bar_config(disable=True)
        self.slots = loraswap.diffusers.attach(self.pipe, list(self.adapters.values()), slots=slots)
        self.pool = AdapterPool(self.slots, resolve=self.adapters.__getitem__)
        denoiser = getattr(self.pipe, "unet", None) or self.pipe.transformer
        denoiser.forward = torch.compile(denoiser.forward, dynamic=True, backend=backend)
        self.lock = threading.Lock()
        self.requests = 0
        self._compiles = loraswap.CompileCounter()

    def validate(self, adapter: str) -> None:
        self.pool.prefetch([adapter])[0].result()

    def check_size(self, request: ImageRequest) -> None:
        """The UNet's graph is specialised to the latent size (diffusers computes with it in Python): only the
        sizes compiled at warm-up are served, so that no request recompiles."""
        if request.size not in self.sizes:
            raise UnservedSizeError(
                f"size {request.size!r} is not served; this server compiled {', '.join(self.sizes)} "
                "(start it with --sizes to serve others)"
            )

    def warm_up(self) -> None:
        """One call per served size compiles the denoiser; counting recompiles starts after them."""
        for size in self.sizes:
            request = ImageRequest(model="warm-up", prompt="warm up", size=size, num_inference_steps=1, seed=0)
            self.generate([(None, request)], count=False)
        self._compiles.__enter__()

    def stats(self) -> dict[str, int]:
        pool = self.pool.stats
        return {"recompiles": self._compiles.graphs, "slot_loads": pool["slot_loads"], "host_hits": pool["host_hits"], "requests": self.requests}

    def generate(self, requests: Sequence[tuple[str | None, ImageRequest]], count: bool = True) -> list[list[str]]:
        """Base64 PNGs for each ``(adapter, request)``: one pipeline call per group of equal settings
        (split where a group names more adapters than there are slots)."""
        groups: dict[tuple, list[int]] = {}
        for index, (_, request) in enumerate(requests):
            groups.setdefault(call_settings(request), []).append(index)
        adapters = [adapter for adapter, _ in requests]
        answers: dict[int, list[str]] = {}
        with self.lock:
            for group in groups.values():
                for indices in pool_batches(group, adapters, len(group), self.pool.slot_count):
                    answers.update(zip(indices, self._call([requests[i] for i in indices])))
            if count:
                self.requests += len(requests)
        return [answers[index] for index in range(len(requests))]

    def _call(self, requests: Sequence[tuple[str | None, ImageRequest]]) -> list[list[str]]:
        first = requests[0][1]
        height, width = first.height_width()
        counts = {request.n for _, request in requests}
        if len(counts) > 1:  # num_images_per_prompt is one number per call
            return [self._call([pair])[0] for pair in requests]
        per_prompt = counts.pop()
        rows = [None if adapter is None else {adapter: request.lora_scale} for adapter, request in requests]
        generators = [generator for _, request in requests for generator in image_generators(request.seed, request.n)]
        with self.pool.route(rows), torch.no_grad():
            images = self.pipe(
                prompt=[request.prompt for _, request in requests],
                num_images_per_prompt=per_prompt,
                height=height,
                width=width,
                num_inference_steps=first.num_inference_steps,
                guidance_scale=first.guidance_scale,
                generator=generators,
            ).images
        encoded = [png_b64(image) for image in images]
        return [encoded[index * per_prompt : (index + 1) * per_prompt] for index in range(len(requests))]
