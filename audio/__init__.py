"""mm_align.audio: the audio modality (adapters, samplers, evaluators, toy world). Filled by later issues."""

__all__: list[str] = []
