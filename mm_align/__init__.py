"""mm-align: preference alignment for image/video diffusion, vision-language and speech models.

The core (this package) holds the losses, the adapter protocol, preference data, the training
loop, configs and reports; it never imports a modality. Modalities live in ``mm_align.image``,
``mm_align.video`` and ``mm_align.audio``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
