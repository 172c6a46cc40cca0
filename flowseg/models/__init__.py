"""Networks: the pixel neural-field velocity model, its discriminative twin, PixNerd checkpoint loading."""

from flowseg.models.field import (
    SIZES,
    DiscriminativeFieldTransformer,
    ModelSize,
    PixelFieldTransformer,
    build_model,
)

__all__ = [
    "SIZES",
    "DiscriminativeFieldTransformer",
    "ModelSize",
    "PixelFieldTransformer",
    "build_model",
]
