"""Networks: the pixel neural-field velocity model, its discriminative twin, PixNerd checkpoint loading."""

from flowseg.models.field import (
    SIZES,
    DiscriminativeFieldTransformer,
    FieldOutput,
    ModelSize,
    PixelFieldTransformer,
    build_model,
)
from flowseg.models.pixnerd import LoadReport, load_pixnerd_checkpoint

__all__ = [
    "SIZES",
    "DiscriminativeFieldTransformer",
    "FieldOutput",
    "LoadReport",
    "ModelSize",
    "PixelFieldTransformer",
    "build_model",
    "load_pixnerd_checkpoint",
]
