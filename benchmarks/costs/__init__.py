"""The cost model's machinery: op-by-op counting of a training step (:mod:`costs.counter`),
the step driver and optimizer (:mod:`costs.step`), the device constants of the roofline
(:mod:`costs.devices`) and the interpreter-side load/store counting that checks the charges
of fastmim's Triton kernels (:mod:`costs.triton_traffic`)."""

# The charges of fastmim's own ops go into the counter's formula tables when the package is
# imported, so every user of the counter sees them; costs.fastmim_ops imports costs.counter,
# never the other way round.
from costs import fastmim_ops  # noqa: E402,F401
