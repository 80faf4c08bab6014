"""The model runtime: Llama-family model, paged KV cache, tree attention, sampling math.

torch only; never imports grpc.
"""

from specmesh.kernels.config import ModelConfig
from specmesh.kernels.loader import LoadedModel, load_for_service, load_model

__all__ = ["LoadedModel", "ModelConfig", "load_for_service", "load_model"]
