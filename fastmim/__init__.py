"""fastmim: fast masked image modeling with fused Triton and CUDA kernels.

Layers: ``fastmim.ops`` (fused ops with plain-PyTorch references), ``fastmim.models``
(MAE, supervised + MIM, CMAE, LUT), ``fastmim.data`` and ``fastmim.train`` (the training
job behind the ``fastmim`` command).
"""

__version__ = "0.1.0"
