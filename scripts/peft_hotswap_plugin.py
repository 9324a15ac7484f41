"""pytest plugin for ``scripts/peft_hotswap_suite.py``: which hotswap functions PEFT's own tests get.

With ``LORASWAP_PEFT_IMPL=loraswap`` it sets ``prepare_model_for_compiled_hotswap``,
``hotswap_adapter`` and ``hotswap_adapter_from_state_dict`` of ``peft.utils.hotswap`` to
loraswap.peft's in ``pytest_configure``, before any test module is imported (so the tests'
``from peft.utils.hotswap import ...`` and diffusers' lazy imports get loraswap's). After
collection it checks that every collected test module that imported one of them holds
loraswap's, and stops the run otherwise. With ``LORASWAP_PEFT_IMPL=peft`` it changes nothing.
"""

from __future__ import annotations

import os

import pytest

FUNCTIONS = ("prepare_model_for_compiled_hotswap", "hotswap_adapter", "hotswap_adapter_from_state_dict")
IMPL_VARIABLE = "LORASWAP_PEFT_IMPL"


def _implementation() -> str:
    impl = os.environ.get(IMPL_VARIABLE, "peft")
    if impl not in ("peft", "loraswap"):
        raise pytest.UsageError(f"{IMPL_VARIABLE}={impl!r}; use 'peft' or 'loraswap'")
    return impl


def pytest_configure(config: pytest.Config) -> None:
    if _implementation() != "loraswap":
        return
    import peft.utils.hotswap as peft_hotswap

    import loraswap.peft as drop_in

    for name in FUNCTIONS:
        setattr(peft_hotswap, name, getattr(drop_in, name))


def pytest_collection_finish(session: pytest.Session) -> None:
    import peft.utils.hotswap as peft_hotswap

    expected_module = "loraswap.peft" if _implementation() == "loraswap" else "peft.utils.hotswap"
    holders = {item.module for item in session.items if getattr(item, "module", None) is not None}
    for holder in (peft_hotswap, *holders):
        for name in FUNCTIONS:
            function = getattr(holder, name, None)
            module = getattr(function, "__module__", "")
            if function is not None and module != expected_module and not module.startswith(expected_module + "."):
                raise pytest.UsageError(
                    f"{holder.__name__}.{name} is {function.__module__}.{name}, expected {expected_module}'s"
                )


def pytest_report_header(config: pytest.Config) -> str:
    return f"peft hotswap functions under test: {_implementation()}"
