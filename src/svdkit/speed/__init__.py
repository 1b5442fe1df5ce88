"""Speed: which ranks run faster than dense on a device (the cost model), and how fast a causal
LM generates (decode tokens/s, prefill time), timed interleaved on a shared machine."""

from .costs import (
    DEFAULT_MARGIN,
    DEFAULT_RANK_MULTIPLE,
    TOKENS,
    CostModel,
    MeasuredCosts,
    SpeedTarget,
    TokenTimes,
    cache_directory,
    cost_model,
    default_rank_multiple,
    describe_device,
    measure_shapes,
    using_costs,
)
from .throughput import GenerationSpeed, generation_speed, speed_ratios
from .timing import best_times

__all__ = [
    "DEFAULT_MARGIN",
    "DEFAULT_RANK_MULTIPLE",
    "TOKENS",
    "CostModel",
    "GenerationSpeed",
    "MeasuredCosts",
    "SpeedTarget",
    "TokenTimes",
    "best_times",
    "cache_directory",
    "cost_model",
    "default_rank_multiple",
    "describe_device",
    "generation_speed",
    "measure_shapes",
    "speed_ratios",
    "using_costs",
]
