from ._estimate import CostEstimate as CostEstimate, estimate as estimate
from ._meter import (
    Cost as Cost,
    Memory as Memory,
    flops as flops,
    forward_pass_equivalents as forward_pass_equivalents,
    measure as measure,
    memory as memory,
)
