"""Fused kernels for mcf (installed as ``mcf.kernels``).

Each op lives in its own file: a pure-PyTorch reference first, then the Triton kernels, their
launchers, the ``torch.library`` registration, the autograd function and the functional API.
"""

from mcf.kernels.decoder_input import decoder_input, decoder_input_ref
from mcf.kernels.masked_attention import masked_attention, masked_attention_ref

__all__ = ["decoder_input", "decoder_input_ref", "masked_attention", "masked_attention_ref"]
