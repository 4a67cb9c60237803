"""The cost model's machinery: op-by-op counting of a training step (:mod:`costs.counter`),
the step driver and optimizer (:mod:`costs.step`), the device constants of the roofline
(:mod:`costs.devices`) and the interpreter-side load/store counting that checks the charges
of fastmim's Triton kernels (:mod:`costs.triton_traffic`)."""
