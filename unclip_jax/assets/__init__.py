"""Files shipped inside the package: the embedded default model, when one is trained."""

import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def default_checkpoint() -> str | None:
    """The pipeline directory shipped with the package (the captioned-shapes model), or None."""
    path = os.path.join(_HERE, "shapes_pipeline")
    return path if os.path.exists(os.path.join(path, "pipeline.json")) else None
