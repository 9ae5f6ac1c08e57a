"""Built-in offline instruction data: six small, exactly checkable tasks.

This module owns the synthetic dataset behind ``load_examples("builtin:tasks")``.
Each task has short prompts (under 25 words) and very short answers (1-6
words) that can be verified by a program, so learning progress can be measured
with exact match without any downloaded data:

``uppercase``
    ``Write this word in capital letters: apple`` -> ``APPLE``
``reverse_words``
    ``Reverse the order of these words: red cat sun`` -> ``sun cat red``
``add``
    ``Add these numbers: 23 + 45`` -> ``68``
``sort_digits``
    ``Sort these numbers from smallest to largest: 7 2 9`` -> ``2 7 9``
``count_words``
    ``How many words are in this phrase: the old dog`` -> ``3``
``last_word``
    ``What is the last word of this phrase: the old dog`` -> ``dog``

The ``group`` of every example is its task name.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from corpora.examples import DatasetError, Example

BUILTIN_TASKS: tuple[str, ...] = (
    "uppercase",
    "reverse_words",
    "add",
    "sort_digits",
    "count_words",
    "last_word",
)

WORDS: tuple[str, ...] = (
    "apple",
    "river",
    "house",
    "green",
    "water",
    "table",
    "light",
    "music",
    "paper",
    "stone",
    "bread",
    "cloud",
    "dream",
    "field",
    "glass",
    "heart",
    "horse",
    "lemon",
    "money",
    "night",
    "ocean",
    "plant",
    "queen",
    "radio",
    "sugar",
    "tiger",
    "train",
    "voice",
    "world",
    "zebra",
    "bird",
    "book",
    "cake",
    "door",
    "fish",
    "game",
    "hand",
    "king",
    "lake",
    "milk",
    "moon",
    "nose",
    "park",
    "rain",
    "ring",
    "road",
    "ship",
    "shoe",
    "snow",
    "star",
    "tree",
    "wind",
    "wolf",
    "yard",
    "baby",
    "ball",
    "bell",
    "boat",
    "cat",
    "dog",
    "sun",
    "red",
    "blue",
    "cold",
    "warm",
    "fast",
    "slow",
    "tall",
    "small",
    "happy",
    "quiet",
    "bright",
    "sweet",
    "brave",
    "clean",
    "early",
    "funny",
    "heavy",
    "young",
    "round",
    "chair",
    "clock",
    "coffee",
    "garden",
    "window",
    "pencil",
    "mirror",
    "forest",
    "island",
    "candle",
    "rabbit",
    "button",
    "orange",
    "silver",
    "winter",
    "summer",
    "letter",
    "market",
    "bridge",
    "castle",
)

_WordTask = Callable[[random.Random], tuple[str, str]]


def _uppercase(rng: random.Random) -> tuple[str, str]:
    """Return an (prompt, response) pair for capitalising one word."""
    word = rng.choice(WORDS)
    return f"Write this word in capital letters: {word}", word.upper()


def _reverse_words(rng: random.Random) -> tuple[str, str]:
    """Return an (prompt, response) pair for reversing 3-5 words."""
    words = rng.sample(WORDS, rng.randint(3, 5))
    prompt = "Reverse the order of these words: " + " ".join(words)
    return prompt, " ".join(reversed(words))


def _add(rng: random.Random) -> tuple[str, str]:
    """Return an (prompt, response) pair for adding two 2-digit numbers."""
    first, second = rng.randint(10, 99), rng.randint(10, 99)
    return f"Add these numbers: {first} + {second}", str(first + second)


def _sort_digits(rng: random.Random) -> tuple[str, str]:
    """Return an (prompt, response) pair for sorting 3-5 digits ascending."""
    digits = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    prompt = "Sort these numbers from smallest to largest: " + " ".join(
        map(str, digits)
    )
    return prompt, " ".join(map(str, sorted(digits)))


def _count_words(rng: random.Random) -> tuple[str, str]:
    """Return an (prompt, response) pair for counting 2-7 words."""
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 7))]
    prompt = "How many words are in this phrase: " + " ".join(words)
    return prompt, str(len(words))


def _last_word(rng: random.Random) -> tuple[str, str]:
    """Return an (prompt, response) pair for naming the last of 2-6 words."""
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
    prompt = "What is the last word of this phrase: " + " ".join(words)
    return prompt, words[-1]


def _generators() -> dict[str, _WordTask]:
    """Map each task name in :data:`BUILTIN_TASKS` to its generator."""
    return {
        "uppercase": _uppercase,
        "reverse_words": _reverse_words,
        "add": _add,
        "sort_digits": _sort_digits,
        "count_words": _count_words,
        "last_word": _last_word,
    }


def _check_tasks(tasks: Sequence[str] | None) -> tuple[str, ...]:
    """Validate a task selection; ``None`` means all built-in tasks."""
    if tasks is None:
        return BUILTIN_TASKS
    if isinstance(tasks, str):
        raise DatasetError(
            f"generate_tasks: tasks must be a sequence of task names, got the string {tasks!r}"
        )
    chosen = tuple(tasks)
    if not chosen:
        raise DatasetError(
            f"generate_tasks: tasks is empty; choose from {', '.join(BUILTIN_TASKS)}"
        )
    unknown = [name for name in chosen if name not in BUILTIN_TASKS]
    if unknown:
        raise DatasetError(
            f"generate_tasks: unknown task(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(BUILTIN_TASKS)}"
        )
    if len(set(chosen)) != len(chosen):
        raise DatasetError(f"generate_tasks: tasks contains duplicates: {chosen}")
    return chosen


def generate_tasks(
    n: int, seed: int, tasks: Sequence[str] | None = None
) -> list[Example]:
    """Generate ``n`` examples of the built-in checkable instruction tasks.

    Tasks are balanced: every selected task gets ``n // len(tasks)`` examples
    and the first ``n % len(tasks)`` tasks (in the given order) one more. The
    examples are returned in a seeded random order. The output depends only on
    ``n``, ``seed`` and ``tasks``.

    Parameters
    ----------
    n : int
        Number of examples, at least 1.
    seed : int
        Seed of the :class:`random.Random` used for every draw.
    tasks : sequence of str, optional
        Subset of :data:`BUILTIN_TASKS` to generate; all of them by default.

    Returns
    -------
    list of Example
        Examples whose ``group`` is the task name.

    Raises
    ------
    DatasetError
        If ``n < 1`` or ``tasks`` is empty, has duplicates or names an
        unknown task.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DatasetError(f"generate_tasks: n must be an integer >= 1, got {n!r}")
    chosen = _check_tasks(tasks)
    generators = _generators()
    rng = random.Random(seed)
    examples = []
    for position in range(n):
        name = chosen[position % len(chosen)]
        prompt, response = generators[name](rng)
        examples.append(Example(prompt=prompt, response=response, group=name))
    rng.shuffle(examples)
    return examples
