"""Builders the tests, the demo and the benchmarks share: tiny random-init models and adapters written offline
(:mod:`.synthetic` for transformers/PEFT, :mod:`.synthetic_diffusers` for diffusers pipelines and LoRA files).
Importing this package imports nothing optional; each builder
imports transformers, PEFT or diffusers when called.
"""
