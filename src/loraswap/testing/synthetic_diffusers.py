"""Tiny random-init diffusers pipelines and LoRA files in diffusers and kohya formats, built offline.

Used by the tests and ``loraswap bench pipeline``. Nothing downloads: the CLIP tokenizer is built from
an in-memory byte-level vocabulary (every byte, plus its ``</w>`` end-of-word variant, no merges), and
every model is built from a config with random weights. LoRA files are written with diffusers' own
``save_lora_weights`` (diffusers/PEFT keys, LoraConfig in the header) or with kohya/A1111 key names
(``lora_unet_*`` / ``lora_te_*`` with ``lora_down``/``lora_up``/``alpha``), as trainers write them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


def tiny_clip_tokenizer():
    """A ``CLIPTokenizer`` over bytes: ``<|startoftext|>``, ``<|endoftext|>``, 256 bytes, 256 ``byte</w>``."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(ch + "</w>" for ch in alphabet)]
    return CLIPTokenizer(vocab={token: index for index, token in enumerate(tokens)}, merges=[], model_max_length=16)


def tiny_clip_text_encoder(
    vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0, with_projection: bool = False
) -> nn.Module:
    """A random-init ``CLIPTextModel`` (``CLIPTextModelWithProjection``, SDXL's second encoder, if asked)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 16, 2),
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=hidden,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def tiny_unet(channels: int = 8, cross_attention_dim: int = 32, seed: int = 0):
    """A random-init two-level ``UNet2DConditionModel`` with one cross-attention block (SD 1.5's layout)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(channels, channels * 2),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=max(channels // 4, 2),
        norm_num_groups=min(channels, 4),
    ).eval()


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(4, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=2,
    ).eval()


def tiny_sd_pipeline(channels: int = 8, text_hidden: int = 32, seed: int = 0):
    """A random-init ``StableDiffusionPipeline`` (fp32, CPU): two-level UNet with one cross-attention block."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    unet = tiny_unet(channels, cross_attention_dim=text_hidden, seed=seed)
    vae = tiny_vae()
    tokenizer = tiny_clip_tokenizer()
    text_encoder = tiny_clip_text_encoder(len(tokenizer), hidden=text_hidden, seed=seed + 1)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(channels: int = 8, text_hidden: int = 16, seed: int = 0):
    """A random-init ``StableDiffusionXLPipeline``: two CLIP text encoders (the second with projection)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(channels, channels * 2),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_hidden * 2,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=text_hidden + 6 * 8,
        norm_num_groups=min(channels, 4),
    ).eval()
    vae = tiny_vae()
    tokenizer = tiny_clip_tokenizer()
    text_encoder = tiny_clip_text_encoder(len(tokenizer), hidden=text_hidden, seed=seed + 1)
    text_encoder_2 = tiny_clip_text_encoder(len(tokenizer), hidden=text_hidden, seed=seed + 2, with_projection=True)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0):
    """A random-init ``FluxPipeline`` with a tiny transformer (patch_size=1, 1 double + 1 single block, head dim 16)
    and a tiny CLIP text encoder; the T5 encoder is left out (``text_encoder_2=None``): LoRAs never target it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
    ).eval()
    tokenizer = tiny_clip_tokenizer()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=tiny_clip_text_encoder(len(tokenizer), hidden=32, seed=seed + 1),
        tokenizer=tokenizer,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    return pipe


@dataclass(frozen=True)
class LoraSpec:
    """What a synthetic LoRA targets in each component: module-name suffixes, a rank, an alpha.

    ``rank_pattern``/``alpha_pattern`` give single modules (by suffix) their own rank/alpha, which
    kohya files express as per-module ``alpha`` tensors.
    """

    targets: Mapping[str, Sequence[str]]  # component -> module-name suffixes
    rank: int = 4
    alpha: float = 4.0
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    seed: int = 0

    def layer_rank_alpha(self, module_name: str) -> tuple[int, float]:
        rank = next((r for key, r in self.rank_pattern.items() if module_name.endswith(key)), self.rank)
        alpha = next((a for key, a in self.alpha_pattern.items() if module_name.endswith(key)), self.alpha)
        return rank, alpha


def random_lora_layers(component: nn.Module, spec: LoraSpec, component_name: str, std: float = 0.1):
    """``{module name: (lora_A, lora_B, rank, alpha)}`` for every Linear/Conv2d of ``component`` that ``spec`` targets."""
    generator = torch.Generator().manual_seed(spec.seed * 1000 + sum(map(ord, component_name)))
    layers = {}
    for name, module in component.named_modules():
        if not any(name == t or name.endswith("." + t) for t in spec.targets.get(component_name, ())):
            continue
        rank, alpha = spec.layer_rank_alpha(name)
        if isinstance(module, nn.Linear):
            a_shape, b_shape = (rank, module.in_features), (module.out_features, rank)
        elif isinstance(module, nn.Conv2d):
            a_shape = (rank, module.in_channels, *module.kernel_size)
            b_shape = (module.out_channels, rank, 1, 1)
        else:
            continue
        lora_A = torch.randn(a_shape, generator=generator) * std
        lora_B = torch.randn(b_shape, generator=generator) * std
        layers[name] = (lora_A, lora_B, rank, float(alpha))
    if spec.targets.get(component_name) and not layers:
        raise ValueError(f"{component_name}: no Linear/Conv2d matches {spec.targets[component_name]}")
    return layers


def write_diffusers_lora(pipe, path: str | Path, spec: LoraSpec) -> Path:
    """A LoRA file as diffusers' ``save_lora_weights`` writes it: ``<component>.<module>.lora_A.weight`` keys and
    each component's LoraConfig (r, lora_alpha, rank/alpha patterns) in the safetensors header."""
    path = Path(path)
    layers_by_component = {}
    metadata_by_component = {}
    for component_name in spec.targets:
        layers = random_lora_layers(getattr(pipe, component_name), spec, component_name)
        layers_by_component[component_name] = {
            f"{name}.lora_{role}.weight": tensor
            for name, (lora_A, lora_B, _, _) in layers.items()
            for role, tensor in (("A", lora_A), ("B", lora_B))
        }
        metadata_by_component[component_name] = {
            "r": spec.rank,
            "lora_alpha": spec.alpha,
            "target_modules": sorted(layers),
            "rank_pattern": {f"^{n}": r for n, (_, _, r, _) in layers.items() if r != spec.rank},
            "alpha_pattern": {f"^{n}": a for n, (_, _, _, a) in layers.items() if a != spec.alpha},
        }
    path.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    for component_name, layers in layers_by_component.items():
        kwargs[f"{component_name}_lora_layers"] = layers
        kwargs[f"{component_name}_lora_adapter_metadata"] = metadata_by_component[component_name]
    type(pipe).save_lora_weights(path, **kwargs)
    return path / "pytorch_lora_weights.safetensors"


KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}


def write_kohya_lora(pipe, path: str | Path, spec: LoraSpec, text_model_prefix: bool = True) -> Path:
    """A kohya/A1111 LoRA file: ``lora_unet_<module_with_underscores>.lora_down.weight``, ``.lora_up.weight`` and
    a per-module ``.alpha``. Text-encoder names carry ``text_model_`` as kohya writes them for CLIP."""
    tensors = {}
    for component_name in spec.targets:
        layers = random_lora_layers(getattr(pipe, component_name), spec, component_name)
        for name, (lora_A, lora_B, _, alpha) in layers.items():
            if component_name.startswith("text_encoder") and text_model_prefix and not name.startswith("text_model."):
                name = "text_model." + name
            key = KOHYA_PREFIXES[component_name] + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = lora_A.contiguous()
            tensors[f"{key}.lora_up.weight"] = lora_B.contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def expected_kohya_scalings(pipe, spec: LoraSpec) -> dict[tuple[str, str], float]:
    """(component, module) -> alpha / rank, computed from the spec alone: what a kohya file's alphas mean."""
    return {
        (component_name, name): alpha / rank
        for component_name in spec.targets
        for name, (_, _, rank, alpha) in random_lora_layers(getattr(pipe, component_name), spec, component_name).items()
    }


def write_kohya_flux_lora(pipe, path: str | Path, seed: int = 0, std: float = 0.1) -> Path:
    """A kohya Flux LoRA for ``tiny_flux_pipeline``'s transformer, in kohya's own block names: a fused
    ``img_attn_qkv`` (diffusers splits it into to_q/to_k/to_v), an attention output, a text MLP and a
    single-block ``linear2``, each with its own rank and alpha."""
    transformer = pipe.transformer
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    mlp = transformer.single_transformer_blocks[0].proj_mlp.out_features
    layers = {  # kohya name: (in, out, rank, alpha)
        "double_blocks_0_img_attn_qkv": (inner, 3 * inner, 4, 2.0),
        "double_blocks_0_img_attn_proj": (inner, inner, 2, 8.0),
        "double_blocks_0_txt_mlp_0": (inner, mlp, 4, 4.0),
        "single_blocks_0_linear2": (inner + mlp, inner, 8, 2.0),
    }
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (n_in, n_out, rank, alpha) in layers.items():
        tensors[f"lora_unet_{name}.lora_down.weight"] = torch.randn(rank, n_in, generator=generator) * std
        tensors[f"lora_unet_{name}.lora_up.weight"] = torch.randn(n_out, rank, generator=generator) * std
        tensors[f"lora_unet_{name}.alpha"] = torch.tensor(alpha)
    path = Path(path)
    save_file(tensors, str(path))
    return path


def write_xlabs_flux_lora(pipe, path: str | Path, seed: int = 0, rank: int = 4, std: float = 0.1) -> Path:
    """An XLabs Flux LoRA for ``tiny_flux_pipeline``'s transformer, in XLabs' own processor names: a fused image
    ``qkv_lora1`` (diffusers splits it into to_q/to_k/to_v) and the image attention output ``proj_lora1``; no alphas."""
    inner = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, n_out in (("qkv_lora1", 3 * inner), ("proj_lora1", inner)):
        tensors[f"double_blocks.0.processor.{name}.down.weight"] = torch.randn(rank, inner, generator=generator) * std
        tensors[f"double_blocks.0.processor.{name}.up.weight"] = torch.randn(n_out, rank, generator=generator) * std
    path = Path(path)
    save_file(tensors, str(path))
    return path


def tiny_t5_tokenizer(max_length: int = 8):
    """A ``T5Tokenizer`` over printable ASCII characters (a Unigram vocabulary, no merges): ``<pad>``, ``</s>``, ``<unk>``."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0), *((chr(c), -1.0) for c in range(33, 127))]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def tiny_t5_encoder(vocab_size: int, hidden: int = 32, seed: int = 0, umt5: bool = False) -> nn.Module:
    """A random-init one-layer ``T5EncoderModel`` (``UMT5EncoderModel``, Wan's encoder, if asked)."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config_class, model_class = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_class(
        vocab_size=vocab_size, d_model=hidden, d_kv=8, d_ff=hidden, num_layers=1, num_heads=hidden // 8,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return model_class(config).eval()


def tiny_sd3_pipeline(seed: int = 0):
    """A random-init ``StableDiffusion3Pipeline`` with its three text encoders: two CLIP with projection (hidden 16,
    pooled 2 x 16) and a one-layer T5 (hidden 32); the VAE is left out (``vae=None``: run with ``output_type="latent"``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=4, patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=32,
    ).eval()  # fmt: skip
    tokenizer = tiny_clip_tokenizer()
    t5_tokenizer = tiny_t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=tiny_clip_text_encoder(len(tokenizer), hidden=16, seed=seed + 1, with_projection=True),
        tokenizer=tokenizer,
        text_encoder_2=tiny_clip_text_encoder(len(tokenizer), hidden=16, seed=seed + 2, with_projection=True),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=tiny_t5_encoder(len(t5_tokenizer), hidden=32, seed=seed + 3),
        tokenizer_3=t5_tokenizer,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_wan_transformer(seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=32,
        freq_dim=16, ffn_dim=32, num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()  # fmt: skip


def tiny_wan_pipeline(seed: int = 0):
    """A random-init Wan 2.2 ``WanPipeline``: ``transformer`` (high-noise steps) and ``transformer_2`` (low-noise
    steps, ``boundary_ratio=0.5``), a one-layer UMT5 text encoder; the VAE is left out (``output_type="latent"``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    tokenizer = tiny_t5_tokenizer()
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=tiny_t5_encoder(len(tokenizer), hidden=32, seed=seed + 1, umt5=True),
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        transformer=tiny_wan_transformer(seed),
        transformer_2=tiny_wan_transformer(seed + 2),
        boundary_ratio=0.5,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def tiny_qwen_tokenizer():
    """A ``Qwen2Tokenizer`` over bytes (byte-level alphabet, no merges) plus the chat tokens QwenImage's prompt template uses."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    tokens = [*QWEN_SPECIAL_TOKENS, *sorted(ByteLevel.alphabet())]
    tokenizer = Qwen2Tokenizer(vocab={token: index for index, token in enumerate(tokens)}, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    return tokenizer


def tiny_qwen_vl_text_encoder(vocab_size: int, hidden: int = 16, seed: int = 0) -> nn.Module:
    """A random-init one-layer ``Qwen2_5_VLForConditionalGeneration`` (QwenImage's text encoder; vision tower of depth 1)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(
        hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}, rope_theta=1e6,
        vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    vision = dict(depth=1, hidden_size=hidden, intermediate_size=hidden, num_heads=2, out_hidden_size=hidden)
    token_ids = {
        name: vocab_size + offset
        for offset, name in enumerate(("vision_start_token_id", "vision_end_token_id", "vision_token_id", "image_token_id", "video_token_id"))
    }  # fmt: skip
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, hidden_size=hidden, vocab_size=vocab_size, **token_ids)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwenimage_pipeline(seed: int = 0):
    """A random-init ``QwenImagePipeline``: a one-block transformer and a one-layer Qwen2.5-VL text encoder (hidden 16);
    the VAE is left out (``output_type="latent"`` gives the packed latents)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    ).eval()  # fmt: skip
    tokenizer = tiny_qwen_tokenizer()
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=tiny_qwen_vl_text_encoder(len(tokenizer), seed=seed + 1),
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Tiny configs of diffusers' transformer models (their own test configs' sizes), with inputs for one forward.
TINY_TRANSFORMERS: dict[str, tuple[str, dict]] = {
    "flux": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
    )),
    "flux2": ("Flux2Transformer2DModel", dict(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4),
    )),
    "chroma": ("ChromaTransformer2DModel", dict(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 4, 8), approximator_num_channels=8, approximator_hidden_dim=16,
        approximator_layers=1,
    )),
    "qwenimage": ("QwenImageTransformer2DModel", dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    )),
    "motif_video": ("MotifVideoTransformer3DModel", dict(
        in_channels=33, out_channels=16, num_attention_heads=2, attention_head_dim=12, num_layers=1,
        num_single_layers=1, num_decoder_layers=0, mlp_ratio=4.0, patch_size=1, patch_size_t=1, qk_norm="rms_norm",
        norm_type="layer_norm", text_embed_dim=32, image_embed_dim=4, rope_theta=256.0, rope_axes_dim=(4, 4, 4),
        enable_text_cross_attention_dual=False, enable_text_cross_attention_single=False,
    )),
    "nucleusmoe_image": ("NucleusMoEImageTransformer2DModel", dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4), moe_enabled=False, capacity_factors=[8.0, 8.0],
    )),
}  # fmt: skip


def tiny_transformer(name: str, seed: int = 0) -> nn.Module:
    """A random-init diffusers transformer of :data:`TINY_TRANSFORMERS` (``name``: flux, flux2, chroma, ...)."""
    import diffusers

    class_name, config = TINY_TRANSFORMERS[name]
    torch.manual_seed(seed)
    return getattr(diffusers, class_name)(**config).eval()


def tiny_transformer_inputs(name: str, seed: int = 0) -> dict:
    """Keyword inputs for one forward of :func:`tiny_transformer` ``(name)``: batch 1, a 4x4 latent (16 tokens)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    timestep = torch.tensor([1.0])
    if name in ("flux", "chroma"):
        pooled = {"pooled_projections": randn(1, 32)} if name == "flux" else {}
        return dict(hidden_states=randn(1, 16, 4), encoder_hidden_states=randn(1, 12, 32), img_ids=randn(16, 3),
                    txt_ids=randn(12, 3), timestep=timestep, **pooled)  # fmt: skip
    if name == "flux2":
        image_ids = torch.cartesian_prod(torch.arange(1), torch.arange(4), torch.arange(4), torch.arange(1))
        text_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(12))
        return dict(hidden_states=randn(1, 16, 4), encoder_hidden_states=randn(1, 12, 32), img_ids=image_ids[None],
                    txt_ids=text_ids[None], timestep=timestep, guidance=torch.tensor([1.0]))  # fmt: skip
    if name in ("qwenimage", "nucleusmoe_image"):
        return dict(hidden_states=randn(1, 16, 16), encoder_hidden_states=randn(1, 8, 16),
                    encoder_hidden_states_mask=torch.ones(1, 8, dtype=torch.long), timestep=timestep,
                    img_shapes=[(1, 4, 4)])  # fmt: skip
    if name == "motif_video":
        return dict(hidden_states=randn(1, 33, 3, 4, 4), encoder_hidden_states=randn(1, 12, 32),
                    timestep=torch.tensor([500]))  # fmt: skip
    raise KeyError(f"no tiny inputs for transformer {name!r}; known: {sorted(TINY_TRANSFORMERS)}")


def write_model_lora(model: nn.Module, directory: str | Path, name: str, seed: int = 0, **lora_options) -> str:
    """A random LoRA (PEFT ``LoraConfig(init_lora_weights=False, **lora_options)``) on a diffusers model, written
    by diffusers' ``save_lora_adapter`` to ``directory/name``; returns the file. ``model`` keeps the adapter (pass
    a throwaway one)."""
    from peft import LoraConfig

    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(init_lora_weights=False, **lora_options), adapter_name=name)
    model.save_lora_adapter(Path(directory) / name, adapter_name=name)
    return str(Path(directory) / name / "pytorch_lora_weights.safetensors")
