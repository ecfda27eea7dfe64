"""The shapes world: prompts, renderer, oracle, and the small trained models the embedded default ships."""
