"""Speech recognisers for the content metrics (WER / CER): an interface and a local transformers CTC model.

The content metrics of the speech suite (:mod:`mm_align.audio.metrics`) transcribe a restoration and
compare the transcript with the clip's reference text. Any object with a ``sample_rate`` and a
``transcribe(wave) -> str`` is an :class:`ASR`; :class:`TransformersCTCASR` loads the user's CTC model
(wav2vec 2.0, HuBERT, data2vec-audio fine-tuned with CTC) from a local directory written by
``save_pretrained`` and decodes greedily (arg-max per frame, repeats merged, blanks dropped: the
tokenizer's CTC decoding; a bos/eos frame counts as a blank). Weights are never downloaded: the path must exist.

:func:`normalize_transcript` is the text normalisation both sides of a WER go through.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

__all__ = ["ASR", "TransformersCTCASR", "normalize_transcript"]


@runtime_checkable
class ASR(Protocol):
    """A speech recogniser: mono float audio at ``sample_rate`` in, text out."""

    sample_rate: int

    def transcribe(self, wave: np.ndarray) -> str: ...


_PUNCT = re.compile(r"[^\w\s']|_")


def normalize_transcript(text: str) -> str:
    """Lower-case, NFKC, punctuation (all but the apostrophe) to spaces, whitespace collapsed.

    ``"Hello, World!"`` → ``"hello world"``; ``"don't"`` stays ``"don't"``. Applied to the reference and the
    hypothesis alike, so a model with an upper-case vocabulary is not charged for case or punctuation.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_PUNCT.sub(" ", text).split())


class TransformersCTCASR:
    """A local transformers CTC model (``AutoModelForCTC`` + ``AutoProcessor``) with greedy decoding.

    Args:
        path: a directory holding the model and its processor (``save_pretrained`` of both).
        device: ``cpu``, ``cuda``, ``cuda:1``… The suite's worker processes each load their own copy.

    The sample rate is read from the feature extractor's ``sampling_rate`` (16 kHz for wav2vec 2.0); the model is
    loaded on first use, so building the metric is cheap and the object can be sent to worker processes.
    """

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: no such ASR model directory (a local save_pretrained output)")
        self.device = device
        self.sample_rate = self._read_sample_rate()
        self._model = None
        self._processor = None

    def _read_sample_rate(self) -> int:
        from transformers import AutoFeatureExtractor

        try:
            extractor = AutoFeatureExtractor.from_pretrained(str(self.path))
        except (OSError, ValueError) as err:
            raise FileNotFoundError(f"{self.path}: no feature extractor config (save the processor with the model: "
                                    f"processor.save_pretrained): {err}") from None
        return int(getattr(extractor, "sampling_rate", 16000))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_model": None, "_processor": None}  # each process loads its own

    def release(self) -> None:
        """Drop the loaded model (a worker process reloads it on first use)."""
        self._model = self._processor = None

    def _load(self) -> None:
        from transformers import AutoModelForCTC, AutoProcessor

        self._processor = AutoProcessor.from_pretrained(str(self.path))
        self._model = AutoModelForCTC.from_pretrained(str(self.path)).to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def transcribe(self, wave: np.ndarray) -> str:
        """Greedy CTC transcript of one ``(T,)`` clip at :attr:`sample_rate`."""
        if self._model is None:
            self._load()
        inputs = self._processor(np.asarray(wave, dtype=np.float32), sampling_rate=self.sample_rate,
                                 return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        logits = self._model(**inputs).logits  # (1, frames, vocab)
        ids = logits.argmax(dim=-1).cpu()  # (1, frames)
        tok = getattr(self._processor, "tokenizer", self._processor)
        # bos/eos frames read as blanks; skip_special_tokens would also drop the blanks before repeats are merged
        for special in {tok.bos_token_id, tok.eos_token_id} - {None, tok.pad_token_id}:
            ids[ids == special] = tok.pad_token_id
        return self._processor.batch_decode(ids)[0]
