"""The paper's 9 label dimensions. Every labeler returns one category per categorical dimension
(plus a keyword list). See docs/labels.md for what each category means.
"""

from __future__ import annotations

DIMENSIONS: dict[str, tuple[str, ...]] = {
    "rumor": ("spread", "counter"),
    "sentiment_state": ("angry", "calm", "happy", "sad", "fear", "surprise"),
    "sentiment_tendency": ("positive", "negative", "neutral"),
    "behavior_type": ("comment", "share"),
    "stance": ("support", "oppose", "neutral"),
    "belief_degree": ("believe", "doubt"),
    "subjectivity": ("subjective", "objective"),
    "intent": ("question", "promotion", "opinion"),
}
# keywords is the ninth dimension: a list of words, compared as a distribution over the top words.
KEYWORDS = "keywords"
ALL_DIMENSIONS: tuple[str, ...] = (*DIMENSIONS, KEYWORDS)

# What the paper assigns to a plain repost (empty text).
PLAIN_REPOST_LABELS: dict[str, str] = {
    "rumor": "spread",
    "sentiment_state": "calm",
    "sentiment_tendency": "neutral",
    "behavior_type": "share",
    "stance": "support",
    "belief_degree": "believe",
    "subjectivity": "objective",
    "intent": "promotion",
}
