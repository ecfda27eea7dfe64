"""The shapes VLM world: the embedded default for vision-language models."""
