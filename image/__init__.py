"""mm_align.image: the image modality (adapters, samplers, evaluators, toy world). Filled by later issues."""

__all__: list[str] = []
