"""SD3 (three text encoders), Wan 2.2 (``transformer`` and ``transformer_2``) and QwenImage: tiny random-init
pipelines built offline, LoRA files written by diffusers' own ``save_lora_weights``, one LoRA per prompt, a
per-call strength and a swap, compiled (dynamo's ``eager`` backend: recompilation is decided by dynamo's guards,
not the backend) under ``error_on_recompile``; each prompt's output equals diffusers' ordinary
``load_lora_weights`` on a one-prompt run of the same pipeline at 1e-4 (fp32).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import pytest
import torch

import loraswap.diffusers as lsd
from loraswap.testing.synthetic_diffusers import (
    LoraSpec,
    tiny_qwenimage_pipeline,
    tiny_sd3_pipeline,
    tiny_wan_pipeline,
    write_diffusers_lora,
)

PROMPTS = ["a cat", "a dog", "a cow"]  # equal lengths: QwenImage pads the text to the longest prompt of the batch


@dataclass(frozen=True)
class PipelineCase:
    """One pipeline: its LoRAs (the first two go to slots 0 and 1, the third is swapped into slot 0), the
    per-prompt rows, the kwarg its strength travels in, its call options and starting latents."""

    build: Callable
    loras: Mapping[str, LoraSpec]
    rows: Sequence[Mapping[int, float]]
    scale_kwarg: str
    call: Mapping[str, object]
    latents: tuple[int, ...]
    compiled: tuple[str, ...]
    into_transformer_2: frozenset[str] = field(default_factory=frozenset)  # Wan 2.2: the low-noise expert's LoRAs


CASES = {
    "sd3": PipelineCase(
        build=tiny_sd3_pipeline,
        loras={
            "transformer-and-both-clips": LoraSpec(
                targets={"transformer": ["to_q", "add_k_proj", "ff.net.0.proj"], "text_encoder": ["q_proj"],
                         "text_encoder_2": ["v_proj", "fc1"]},
                rank=4, alpha=8, seed=1,
            ),
            "transformer-only": LoraSpec(targets={"transformer": ["to_v", "to_out.0", "proj_out"]}, rank=8, alpha=4, seed=2),
            "clip-2-only": LoraSpec(targets={"text_encoder_2": ["k_proj", "out_proj"]}, rank=2, alpha=4, seed=3),
        },
        rows=[{0: 1.0}, {1: 1.0}, {}],
        scale_kwarg="joint_attention_kwargs",
        call=dict(height=32, width=32, max_sequence_length=8, guidance_scale=4.0),
        latents=(3, 4, 4, 4),
        compiled=("transformer", "text_encoder", "text_encoder_2"),
    ),
    "wan": PipelineCase(
        build=tiny_wan_pipeline,
        loras={
            "high-noise": LoraSpec(targets={"transformer": ["attn1.to_q", "attn2.to_v", "ffn.net.0.proj"]}, rank=4, alpha=8, seed=1),
            "low-noise": LoraSpec(targets={"transformer": ["attn1.to_k", "ffn.net.2", "proj_out"]}, rank=8, alpha=4, seed=2),
            "high-noise-b": LoraSpec(targets={"transformer": ["attn2.to_k", "to_out.0"]}, rank=2, alpha=2, seed=3),
        },
        rows=[{0: 1.0, 1: 1.0}, {1: 1.0}, {}],  # Wan 2.2 LoRAs come in pairs: one per expert
        scale_kwarg="attention_kwargs",
        call=dict(height=16, width=16, num_frames=5, max_sequence_length=8, guidance_scale=3.0, num_inference_steps=2),
        latents=(3, 4, 2, 2, 2),
        compiled=("transformer", "transformer_2"),
        into_transformer_2=frozenset({"low-noise"}),
    ),
    "qwenimage": PipelineCase(
        build=tiny_qwenimage_pipeline,
        loras={
            "attention": LoraSpec(targets={"transformer": ["to_q", "to_k", "add_v_proj"]}, rank=4, alpha=8, seed=1),
            "mlp": LoraSpec(targets={"transformer": ["img_mlp.net.0.proj", "txt_mlp.net.2", "to_out.0"]}, rank=8, alpha=4, seed=2),
            "modulation": LoraSpec(targets={"transformer": ["img_mod.1", "to_add_out"]}, rank=2, alpha=2, seed=3),
        },
        rows=[{0: 1.0}, {1: 1.0}, {}],
        scale_kwarg="attention_kwargs",
        call=dict(height=32, width=32, max_sequence_length=8, negative_prompt=" ", true_cfg_scale=2.0),
        latents=(3, 4, 16),  # packed: 2x2 patches of 4 channels
        compiled=("transformer",),
    ),
}


def run(pipe, case: PipelineCase, prompts, latents, scale=None):
    options = {} if scale is None else {case.scale_kwarg: {"scale": scale}}
    call = {"num_inference_steps": 1, **case.call, **options}
    with torch.no_grad():
        return pipe(prompts, latents=latents, output_type="latent", generator=torch.Generator().manual_seed(0), **call)[0]


def load_kwargs(case: PipelineCase, name: str) -> dict:
    return {"load_into_transformer_2": True} if name in case.into_transformer_2 else {}


class DiffusersReferences:
    """diffusers' own eager pipeline with the given LoRAs loaded the ordinary way, one prompt per run.

    Each is a copy of a pipeline that never ran: a pipeline called with a scale keeps it (``_lora_scale``) and
    applies it to the text-encoder LoRAs it loads afterwards."""

    def __init__(self, base, case: PipelineCase, files: Mapping[str, object], latents: torch.Tensor) -> None:
        self.pristine, self.case, self.files, self.latents = copy.deepcopy(base), case, files, latents
        self.pipes: dict[tuple[str, ...], object] = {}

    def output(self, loras: tuple[str, ...], index: int, scale=None) -> torch.Tensor:
        if loras not in self.pipes:
            pipe = copy.deepcopy(self.pristine)
            for name in loras:
                pipe.load_lora_weights(str(self.files[name]), adapter_name=name, **load_kwargs(self.case, name))
            self.pipes[loras] = pipe
        return run(self.pipes[loras], self.case, [PROMPTS[index]], self.latents[index : index + 1], scale)


@pytest.mark.parametrize("name", list(CASES))
def test_per_prompt_loras_strengths_and_swaps_compiled_match_diffusers(name, tmp_path):
    case = CASES[name]
    base = case.build()
    files = {lora: write_diffusers_lora(base, tmp_path / lora, spec) for lora, spec in case.loras.items()}
    latents = torch.randn(case.latents, generator=torch.Generator().manual_seed(1))
    references = DiffusersReferences(base, case, files, latents)
    sources = {
        lora: lsd.read_pipeline_adapter(base, path, **load_kwargs(case, lora)) if case.into_transformer_2 else path
        for lora, path in files.items()
    }
    pipe = copy.deepcopy(base)
    pipeline_slots = lsd.attach(pipe, list(sources.values()), slots=2, max_blend=2)
    names = list(case.loras)
    loaded = names[:2]
    for slot, lora in enumerate(loaded):
        pipeline_slots.load(sources[lora], slot)
    if name == "sd3":
        assert set(pipeline_slots.components) == {"transformer", "text_encoder", "text_encoder_2"}
    if name == "wan":
        assert set(pipeline_slots.components) == {"transformer", "transformer_2"}
    torch._dynamo.reset()
    for component in case.compiled:
        getattr(pipe, component).compile(backend="eager")
    pipeline_slots.blend(case.rows)
    run(pipe, case, PROMPTS, latents)  # the one compilation of each component

    def check(scale=None):
        batched = run(pipe, case, PROMPTS, latents, scale)
        for index, row in enumerate(case.rows):
            expected = references.output(tuple(loaded[slot] for slot in sorted(row)), index, scale)
            torch.testing.assert_close(batched[index : index + 1], expected, atol=1e-4, rtol=0)

    with torch._dynamo.config.patch(error_on_recompile=True):
        check()
        check(scale=0.5)
        pipeline_slots.load(sources[names[2]], 0)
        loaded[0] = names[2]
        check()
    assert (references.output((names[2],), 0) - references.output((), 0)).abs().max() > 1e-3  # the LoRA shows
