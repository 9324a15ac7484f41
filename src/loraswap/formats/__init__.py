"""The one reader of adapter files; every path that reads an adapter goes through these modules.

- :mod:`.locate`: a source (path or hub id) -> its weights file, config and kind; what an adapter folder is.
- :mod:`.lora_keys`: the key families (PEFT, kohya/LyCORIS, XLabs, legacy diffusers) and the config-to-scaling rules.
- :mod:`.safetensors`: the header parser and checks, whole-file reads into one buffer, slice reads.
- :mod:`.support`: what cannot be hot-swapped exactly, from key names and config alone (refused, named).

Data flows one way: locate -> read -> check -> (``loraswap.adapter``) normalise; nothing here imports what
stands above it (the adapter, the slots, the pool, the integrations).
"""
