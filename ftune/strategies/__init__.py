"""The strategy registry: importing this package registers every strategy (see ftune/strategies/base.py)."""

from ftune.strategies import continual, dann, distill, domain_adapt, multitask  # noqa: F401  (registration side effects)
from ftune.strategies.base import STRATEGIES, Strategy, StrategyContext, build_strategy, register_strategy

__all__ = ["STRATEGIES", "Strategy", "StrategyContext", "build_strategy", "register_strategy"]
