"""mm_align.vlm: vision-language models (adapter over transformers image-text-to-text models, MIA-DPO data,
image-side rejections, VLM benchmark runners, the shapes VLM world).

Its own package rather than part of ``image/``: ``image/`` holds text-to-image generation (diffusers); a VLM is a
token model over transformers with its own processor, chat template, data formats and benchmarks, and the
video-LLM work reuses it (``video/`` imports ``mm_align.vlm``, never ``mm_align.image``).
"""

__all__: list[str] = []
