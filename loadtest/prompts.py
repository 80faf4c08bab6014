"""The bench's prompt sets.

OPEN: short story openings: the model writes freely (little for n-gram drafting to copy).
GROUNDED: a passage, then a request whose answer copies from it (repeat, quote, list, extract):
the tasks where model-free drafting pays (summaries, extraction, RAG answers, code edits).
"""

from __future__ import annotations

OPEN = [
    "Once upon a time", "The little dog", "One day, a girl named Lily", "Tom had a big red ball",
    "The sun was shining and", "In a small house there lived", "The cat wanted to", "Sam and Mia",
    "There was a tiny bird", "Mom said, \"Let's go to the park", "The boy found a box",
    "It was a rainy day", "A little fish swam", "The old tree", "Ben liked to play with",
    "Once there was a happy frog",
]

_PASSAGES = [
    "The Amazon rainforest covers much of the Amazon basin of South America. The basin spans "
    "seven million square kilometres, of which five and a half million are covered by the "
    "rainforest. The region includes territory belonging to nine nations.",
    "Marie Curie was a physicist and chemist who conducted pioneering research on "
    "radioactivity. She was the first woman to win a Nobel Prize, and the only person to win "
    "Nobel Prizes in two different sciences. She was born in Warsaw in 1867.",
    "The recipe needs two cups of flour, one cup of sugar, three eggs, half a cup of butter and "
    "a teaspoon of vanilla. Mix the butter and sugar first, then add the eggs one at a time. "
    "Bake at 180 degrees for thirty minutes.",
    "def area(width, height):\n    return width * height\n\n\ndef perimeter(width, height):\n"
    "    return 2 * (width + height)\n",
]
_REQUESTS = [
    "Repeat the second sentence of the passage exactly.",
    "Quote the first sentence of the passage word for word.",
    "Copy the whole passage exactly as it is written.",
    "List every number that appears in the passage, with the words around it.",
]
GROUNDED = [f"Passage:\n{p}\n\n{r}" for r in _REQUESTS for p in _PASSAGES]
SETS = {"open": OPEN, "grounded": GROUNDED}
