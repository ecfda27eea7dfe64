"""Test-wide settings: no network (an accidental download fails fast), no trackers, few threads."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("MM_ALIGN_CACHE", os.path.join(os.environ.get("TMPDIR", "/tmp"), "mm_align_test_cache"))
