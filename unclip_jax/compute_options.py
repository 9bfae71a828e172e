"""The names of the compute settings that models, the trainer, the pipeline and the CLIs accept.

Kept free of JAX imports, so that a command line can list them before JAX starts.
"""

from typing import Literal, get_args

ComputeDtype = Literal["float32", "bfloat16", "float16"]
COMPUTE_DTYPES: tuple[str, ...] = get_args(ComputeDtype)

# "xla" runs everywhere; "cudnn" is flash attention on NVIDIA GPUs, "splash" Pallas flash
# attention on TPUs; "auto" picks cudnn where it applies, else xla
# (unclip_jax.models.attention.dot_product_attention).
AttentionImplementation = Literal["xla", "cudnn", "splash", "auto"]
ATTENTION_IMPLEMENTATIONS: tuple[str, ...] = get_args(AttentionImplementation)
