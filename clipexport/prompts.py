"""Real prompts for text-tower parity.

Random token ids never exercise argmax-on-EOT pooling; these do, with EOT at many
positions: short and long prompts, one past the context length (truncated, EOT kept
at the last position), punctuation, accents, CJK and emoji.
"""

from __future__ import annotations

PARITY_PROMPTS: tuple[str, ...] = (
    "a photo of a dog.",
    "a blurry photo of a tabby cat sleeping on a red sofa.",
    "diagram",
    "an oil painting of a lighthouse on a cliff during a storm, with waves crashing against the rocks below.",
    "Une photo d'un café à Paris, très ensoleillée.",
    "東京の夜景の写真",
    "a 🍕 pizza with 🍄 mushrooms!!!",
    "itap of a vintage camera; 35mm film, f/1.8 — shallow depth of field & warm tones.",
    " ".join(["a very long caption that keeps going"] * 20),  # > 77 tokens: truncated, EOT kept
    "",
    "A PHOTO OF THE NUMBER 7.",
)
