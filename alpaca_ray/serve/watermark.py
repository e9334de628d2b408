"""An output watermark after Kirchenbauer et al. 2023, "A Watermark for Large Language Models".

At each step the previous token seeds a generator that splits the vocabulary: a fraction ``gamma`` is the
"green list", and ``delta`` is added to those tokens' logits before sampling. Text written this way holds
more green tokens than chance; the detector re-derives each green list from the text alone (it needs the
tokenizer and the secret key, not the model) and tests the green count with a one-sided z-test:

    z = (green - gamma * T) / sqrt(T * gamma * (1 - gamma))

Under the null hypothesis (text written without the key) z is about standard normal, so a threshold of 4
gives a false-positive rate of about 3.2e-5 per text.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch

DEFAULT_KEY = 15485863  # the paper's hash key (a large prime)


@lru_cache(maxsize=8192)
def _green_list_cached(prev_token: int, vocab_size: int, gamma: float, key: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed((key * prev_token) % (2**63 - 1))
    permutation = torch.randperm(vocab_size, generator=generator)
    return permutation[: int(gamma * vocab_size)]


def green_list(prev_token: int, vocab_size: int, gamma: float = 0.25, key: int = DEFAULT_KEY) -> torch.Tensor:
    """Token ids of the green list that follows ``prev_token`` (same ids for generator and detector)."""
    return _green_list_cached(int(prev_token), int(vocab_size), float(gamma), int(key))


class WatermarkLogitsProcessor:
    """Adds ``delta`` to the green-list logits of each row, seeded by that row's last token.

    Called as ``processor(input_ids [B, T], logits [B, V]) -> logits``, like a transformers logits processor,
    so it works both in our engine loop and in ``model.generate(logits_processor=[...])``.
    """

    def __init__(self, vocab_size: int, gamma: float = 0.25, delta: float = 2.0, key: int = DEFAULT_KEY):
        self.vocab_size, self.gamma, self.delta, self.key = vocab_size, gamma, delta, key

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        bias = torch.zeros_like(scores)
        for row, prev in enumerate(input_ids[:, -1].tolist()):
            green = green_list(prev, self.vocab_size, self.gamma, self.key).to(scores.device)
            bias[row, green[green < scores.shape[-1]]] = self.delta
        return scores + bias


@dataclass
class Detection:
    """The detector's answer for one text."""

    z_score: float
    p_value: float
    num_tokens_scored: int
    num_green: int
    green_fraction: float
    watermarked: bool
    z_threshold: float
    gamma: float

    def to_dict(self) -> dict:
        return asdict(self)


def detect_token_ids(token_ids: list[int], vocab_size: int, gamma: float = 0.25, key: int = DEFAULT_KEY,
                     z_threshold: float = 4.0) -> Detection:
    """Score a token sequence: each token after the first is green or not given its predecessor."""
    scored = 0
    green = 0
    # each distinct (previous, token) pair counts once: a repeated pair is green or not every time, so
    # counting repeats would break the independence the z-test assumes (Kirchenbauer et al. 2023b)
    for prev, token in dict.fromkeys(zip(token_ids[:-1], token_ids[1:])):
        scored += 1
        green += int(bool((green_list(prev, vocab_size, gamma, key) == token).any()))
    if scored == 0:
        return Detection(0.0, 1.0, 0, 0, 0.0, False, z_threshold, gamma)
    z = (green - gamma * scored) / math.sqrt(scored * gamma * (1 - gamma))
    p_value = 0.5 * math.erfc(z / math.sqrt(2))  # one-sided: P(Z >= z)
    return Detection(z, p_value, scored, green, green / scored, z > z_threshold, z_threshold, gamma)


def watermark_vocab_size(model_path: str) -> int:
    """The logits width the generator used: the model config's ``vocab_size`` (read without weights)."""
    from transformers import AutoConfig

    from alpaca_ray.serve.engine import base_model_path  # a LoRA adapter directory has its base's vocabulary

    config = AutoConfig.from_pretrained(base_model_path(model_path))
    vocab_size = getattr(config, "vocab_size", None) or getattr(config.get_text_config(), "vocab_size", None)
    if not vocab_size:
        raise ValueError(f"{model_path}: its config has no vocab_size")
    return int(vocab_size)


class WatermarkDetector:
    """Detects the watermark in plain text; needs the serving model's tokenizer, key and gamma."""

    def __init__(self, tokenizer, vocab_size: int, gamma: float = 0.25, key: int = DEFAULT_KEY,
                 z_threshold: float = 4.0):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.gamma, self.key, self.z_threshold = gamma, key, z_threshold

    @classmethod
    def from_model(cls, model_path: str, gamma: float = 0.25, key: int = DEFAULT_KEY,
                   z_threshold: float = 4.0) -> WatermarkDetector:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(model_path), watermark_vocab_size(model_path), gamma, key,
                   z_threshold)

    def detect(self, text: str) -> Detection:
        token_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return detect_token_ids(token_ids, self.vocab_size, self.gamma, self.key, self.z_threshold)
