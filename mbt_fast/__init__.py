"""mbt_fast: Scenic's Multimodal Bottleneck Transformer on fused Triton and CUDA kernels."""
from mbt_fast.config import PRESETS, MBTConfig
from mbt_fast.model import MBT
from mbt_fast.modalities import register_modality, registered_modalities

__version__ = "0.1.0"


def load_scenic_checkpoint(path, cfg: MBTConfig, backend: str = "torch") -> MBT:
    """Load a Scenic/Flax msgpack checkpoint (train state or bare params) into an eval-mode ``MBT``."""
    from mbt_fast.convert import load_scenic_checkpoint as _load

    return _load(path, cfg, backend=backend)


def init_from_vit(model: MBT, state_dict) -> MBT:
    """Initialise ``model`` from a timm ViT-B/16 ``state_dict`` as the paper does."""
    from mbt_fast.vit_init import init_from_vit as _init

    return _init(model, state_dict)


__all__ = ["MBT", "MBTConfig", "PRESETS", "load_scenic_checkpoint", "init_from_vit", "register_modality",
           "registered_modalities", "__version__"]
