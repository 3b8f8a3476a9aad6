"""The method registry: importing this package registers every method family."""

from ftune.methods import (  # noqa: F401  (registration side effects)
    adapters,
    lora,
    mixtures,
    moe,
    peft_generic,
    prompts,
    selective,
)
from ftune.methods.base import METHODS, Method, MethodContext, build_method, register_method

__all__ = ["METHODS", "Method", "MethodContext", "build_method", "register_method"]
