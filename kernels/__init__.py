"""Fused kernels for mcf (installed as ``mcf.kernels``).

Each op lives in its own file: a pure-PyTorch reference first, then the Triton kernels, their
launchers, the ``torch.library`` registration, the autograd and the functional API. ``dispatch``
says whether Triton can run on a device (``triton_status``) and whether ``attention.backend=auto``
should use it (``prefer_triton``, from benchmark measurements only). Without triton installed the
references still import; the Triton functions then raise with the reason.
"""

from mcf.kernels.decoder_input import decoder_input, decoder_input_ref
from mcf.kernels.dispatch import TRITON_FASTER, TritonFaster, prefer_triton, triton_status
from mcf.kernels.masked_attention import masked_attention, masked_attention_ref

__all__ = [
    "TRITON_FASTER",
    "TritonFaster",
    "decoder_input",
    "decoder_input_ref",
    "masked_attention",
    "masked_attention_ref",
    "prefer_triton",
    "triton_status",
]
