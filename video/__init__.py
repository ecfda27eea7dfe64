"""mm_align.video: the video modality (adapters, samplers, evaluators, toy world). Filled by later issues."""

__all__: list[str] = []
