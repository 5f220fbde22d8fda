"""The operations the model layers call, each in the form for its platform.

The layers (vit_jax.models.layers, attention, resnet_layers) are written as
the papers describe them; the operations they call live here, each computing
one function in the form that suits the program being traced:

    dense, dense_each       2-D row matmuls or dot_generals (matmul.py)
    conv                    a patch embedding as reshape + matmul, or a convolution
    layer_norm              LayerNorm with a written-out derivative (norm.py)
    gelu_tanh               GELU with a written-out derivative (activation.py);
                            ACTIVATIONS: the MLP activations by name
    dot_product_attention   XLA, cuDNN or head-major attention (attention.py)

`platform.forms()` decides every form, once, from the target platform
(`compiling_for(...)`, else JAX's default backend) and whether a scanned
layer stack is being traced.
"""

from vit_jax.models.ops.activation import ACTIVATIONS, gelu_tanh
from vit_jax.models.ops.attention import dot_product_attention
from vit_jax.models.ops.matmul import conv, dense, dense_each
from vit_jax.models.ops.norm import layer_norm
from vit_jax.models.ops.platform import compiling_for, forms, target_platform

__all__ = ["ACTIVATIONS", "compiling_for", "conv", "dense", "dense_each", "dot_product_attention",
           "forms", "gelu_tanh", "layer_norm", "target_platform"]
