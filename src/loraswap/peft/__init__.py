"""PEFT's hotswap API as a drop-in: change ``from peft.utils.hotswap import ...`` to ``from loraswap.peft import ...``.

The functions keep the installed PEFT's signatures, defaults, exception types and messages (PEFT
0.21.x and 0.22.x; where the two disagree, which config an incoming adapter is checked against,
``common.loaded_config`` follows the installed version), and work on ``PeftModel``s (compiled or
not) and on diffusers models that carry PEFT LoRA layers. The package: ``prepare`` pads, ``state_dict``
checks and writes a swap, ``hotswap`` reads an adapter and caches it. The model keeps PEFT's own LoRA
layers: ``prepare_model_for_compiled_hotswap`` pads their ``lora_A``/``lora_B`` and
turns their scalings into tensors, as PEFT does. Where loraswap differs, PEFT's observable behaviour
is kept for everything PEFT accepts:

- a swap is transactional: everything PEFT would check while it swaps is checked first, in PEFT's
  order, on fresh tensors, so a swap that PEFT would abandon halfway raises the same exception (type
  and message) and leaves every tensor of the model bit-for-bit as it was.
  ``prepare_model_for_compiled_hotswap`` likewise builds every padded layer before it installs any;
- an adapter's keys are those whose component after the ``lora_*`` container is exactly the adapter
  name, so swapping ``foo`` never zeroes ``foobar`` (PEFT issue 3780, fixed in PEFT 0.22; loraswap
  gives 0.22's answer on 0.21 too);
- ``rank_pattern``/``alpha_pattern`` are matched against the module's name in the base model, as
  PEFT matches them when it builds the layer, not against the parameter key (PEFT issue 3738, fixed
  in PEFT 0.22; loraswap gives 0.22's answer on 0.21 too);
- after a swap, ``peft_config[adapter_name]`` and each layer's ``r``/``lora_alpha`` hold the
  incoming adapter's ``r``, ``lora_alpha`` and ``rank_pattern``, where PEFT keeps the first
  adapter's (issue 3581); ``alpha_pattern`` is already equal: PEFT's compatibility check requires it;
- ``hotswap_adapter`` keeps each adapter it read from a local directory in a host cache, laid out
  for the model's tensors: a repeated swap is one ``torch._foreach_copy_`` and reads nothing from
  disk. Entries are keyed by the files' size and modification time and by the shapes of the model's
  LoRA tensors, so a changed file or a changed model is read again. Hub ids are read by PEFT each time.

Only new keyword arguments add behaviour, and their defaults keep PEFT's: ``target_modules`` of
``prepare_model_for_compiled_hotswap`` gives layers the first adapter did not target a zero LoRA of
``target_rank``, so that later adapters may target them.
"""

from .hotswap import check_hotswap_configs_compatible, clear_hotswap_cache, hotswap_adapter
from .prepare import prepare_model_for_compiled_hotswap
from .state_dict import hotswap_adapter_from_state_dict

__all__ = [
    "check_hotswap_configs_compatible",
    "clear_hotswap_cache",
    "hotswap_adapter",
    "hotswap_adapter_from_state_dict",
    "prepare_model_for_compiled_hotswap",
]
