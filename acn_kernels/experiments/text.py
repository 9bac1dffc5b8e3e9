"""Language-model data that needs no network and is the same bytes on every machine.

- `addition_examples`: n-digit addition with the answer's digits reversed (the authors' arithmetic
  task, teaching-arithmetic style): "493+85=875\n" is 493 + 85 = 578, written from its last digit. Scored
  by exact match of the whole answer at every depth (teacher-forced: every answer token right is the
  same as greedy decoding producing the answer).
- `corpus`: English-like text from a probabilistic grammar and a fixed seed, byte-level (tokens are
  bytes): sentences with relative clauses whose verbs agree with a distant subject, characters named
  and then referred back to by pronoun, quotations and parentheses that must close, counting in words,
  and sums whose results must be right. At the sizes the paper trains a 4-layer model does not exhaust
  it: deeper models keep lowering the loss.

Randomness comes from SplitMix64 seeded here, not from Python's `random`, whose methods may change
between versions: a test pins the default corpus by its sha256.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

VOCAB = 256  # byte-level
CORPUS_BYTES = 1_200_000


class SplitMix64:
    """A small deterministic generator (SplitMix64): the same numbers on every platform and Python."""

    MASK = (1 << 64) - 1

    def __init__(self, seed: int):
        self.state = seed & self.MASK

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & self.MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self.MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self.MASK
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        """A uniform integer in [0, n) (n far below 2^64, so the modulo's bias does not matter)."""
        return self.next() % n

    def choice(self, items):
        return items[self.below(len(items))]

    def chance(self, percent: int) -> bool:
        return self.below(100) < percent


# ----------------------------------------------------------------------------- addition

def addition_line(a: int, b: int) -> str:
    return f"{a}+{b}={str(a + b)[::-1]}\n"


def addition_examples(count: int, digits: int, seed: int) -> list[str]:
    """`count` lines "a+b=reversed(a+b)\\n", a and b of 1 to `digits` digits."""
    rng = SplitMix64(seed)
    lines = []
    for _ in range(count):
        a, b = (rng.below(10 ** (1 + rng.below(digits))) for _ in range(2))
        lines.append(addition_line(a, b))
    return lines


@dataclass
class Addition:
    """Token rows (padded with "\\n") and, per row, the target mask of the answer tokens: the reversed
    digits and the newline that ends them."""
    tokens: torch.Tensor      # (count, length) int64 bytes
    answer: torch.Tensor      # (count, length - 1) bool: which next-token targets are the answer's


def encode_additions(lines: list[str], length: int) -> Addition:
    rows, answers = [], []
    for line in lines:
        data = list(line.encode("ascii"))
        if len(data) > length:
            raise ValueError(f"length must hold every line, got {length} for {line!r}")
        equals = data.index(ord("="))
        rows.append(data + [ord("\n")] * (length - len(data)))
        answers.append([equals <= i < len(data) - 1 for i in range(length - 1)])  # targets after "=" to "\n"
    return Addition(torch.tensor(rows), torch.tensor(answers))


# ----------------------------------------------------------------------------- the corpus grammar

NOUNS = [("dog", "dogs"), ("cat", "cats"), ("teacher", "teachers"), ("river", "rivers"), ("city", "cities"),
         ("child", "children"), ("farmer", "farmers"), ("bird", "birds"), ("engineer", "engineers"),
         ("machine", "machines"), ("letter", "letters"), ("garden", "gardens"), ("storm", "storms"),
         ("painter", "painters"), ("ship", "ships"), ("mountain", "mountains"), ("doctor", "doctors"),
         ("lamp", "lamps"), ("student", "students"), ("window", "windows")]
VERBS = [("sees", "see"), ("follows", "follow"), ("remembers", "remember"), ("paints", "paint"),
         ("builds", "build"), ("answers", "answer"), ("carries", "carry"), ("watches", "watch"),
         ("finds", "find"), ("praises", "praise"), ("fears", "fear"), ("visits", "visit")]
INTRANSITIVE = [("sleeps", "sleep"), ("laughs", "laugh"), ("waits", "wait"), ("sings", "sing"),
                ("runs", "run"), ("disappears", "disappear"), ("listens", "listen")]
ADJECTIVES = ["old", "quiet", "bright", "tired", "green", "strange", "small", "careful", "distant", "broken",
              "gentle", "hungry"]
ADVERBS = ["slowly", "again", "at night", "without a word", "every morning", "in the rain", "twice"]
PLACES = ["the market", "the harbor", "the old library", "the station", "the forest", "the bridge",
          "the school", "the hill"]
NAMES = [("Ada", "she", "her"), ("Boris", "he", "him"), ("Chiara", "she", "her"), ("Dmitri", "he", "him"),
         ("Elena", "she", "her"), ("Farid", "he", "him"), ("Grace", "she", "her"), ("Hugo", "he", "him"),
         ("Ines", "she", "her"), ("Jonas", "he", "him")]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]


def with_article(text: str) -> str:
    """ "a ..." made "an ..." before a vowel."""
    return "an " + text[2:] if text.startswith("a ") and text[2] in "aeiou" else text


class Grammar:
    """Sentences whose next byte depends on what came long before it."""

    def __init__(self, rng: SplitMix64):
        self.rng = rng

    def noun_phrase(self, depth: int = 0) -> tuple[str, bool]:
        """(text, plural): a determiner, maybe adjectives, a noun, maybe a relative clause (which
        agrees with its own noun, so the main verb must look past it)."""
        r = self.rng
        plural = r.chance(40)
        noun = r.choice(NOUNS)[plural]
        adjectives = " ".join(r.choice(ADJECTIVES) for _ in range(r.below(3)))
        determiner = r.choice(["the", "some", "many", "these"] if plural else ["the", "a", "this", "every"])
        text = with_article(" ".join(filter(None, [determiner, adjectives, noun])))
        if depth < 2 and r.chance(35):
            clause_plural = r.chance(40)
            object_noun = r.choice(NOUNS)[clause_plural]
            verb = r.choice(VERBS)[plural]
            text += f" that {verb} the {object_noun}" if r.chance(50) else \
                f" that the {object_noun} {r.choice(VERBS)[clause_plural]}"
        return text, plural

    def clause(self, depth: int = 0) -> str:
        r = self.rng
        subject, plural = self.noun_phrase(depth)
        if r.chance(50):
            obj, _ = self.noun_phrase(depth + 1)
            text = f"{subject} {r.choice(VERBS)[plural]} {obj}"
        else:
            text = f"{subject} {r.choice(INTRANSITIVE)[plural]}"
        if r.chance(30):
            text += " " + r.choice(ADVERBS)
        if r.chance(15):
            text += f" ({self.aside()})"
        return text

    def aside(self) -> str:
        r = self.rng
        return r.choice([f"near {r.choice(PLACES)}", f"as {r.choice(NAMES)[0]} said", "or so it seemed",
                         f"{r.choice(NUMBERS[2:12])} times"])

    def sentence(self) -> str:
        r = self.rng
        text = self.clause()
        if r.chance(25):
            text += r.choice([", and ", ", but ", " because "]) + self.clause(1)
        return text[0].upper() + text[1:] + "."

    def story(self) -> str:
        """A named character referred back to by pronoun, a quotation that closes, a place revisited."""
        r = self.rng
        name, pronoun, object_pronoun = r.choice(NAMES)
        place = r.choice(PLACES)
        friend = r.choice([n for n in NAMES if n[0] != name])
        noun, _ = r.choice(NOUNS)
        lines = [f"{name} walked to {place}.",
                 f"There {pronoun} met {friend[0]}, who was carrying "
                 f"{with_article(f'a {r.choice(ADJECTIVES)} {noun}')}.",
                 f'"Where did you find the {noun}?" {name} asked.',
                 f'"Behind {place}," {friend[0]} said, and {friend[1]} gave it to {object_pronoun}.']
        if r.chance(50):
            lines.append(f"Later {name} left {place} with the {noun}.")
        return " ".join(lines)

    def counting(self) -> str:
        r = self.rng
        start, length = r.below(10), 3 + r.below(8)
        return f"{r.choice(NAMES)[0]} counted: {', '.join(NUMBERS[start:start + length])}."

    def arithmetic(self) -> str:
        r = self.rng
        a, b = r.below(100), r.below(100)
        return r.choice([f"{a} plus {b} is {a + b}.", f"The sum of {a} and {b} is {a + b}.",
                         f"If you add {b} to {a}, you get {a + b}."])

    def paragraph(self) -> str:
        r = self.rng
        parts = []
        for _ in range(2 + r.below(5)):
            kind = r.below(10)
            parts.append(self.story() if kind < 2 else self.counting() if kind < 3 else
                         self.arithmetic() if kind < 4 else self.sentence())
        return " ".join(parts) + "\n\n"


def corpus(size: int = CORPUS_BYTES, seed: int = 2026) -> bytes:
    """`size` bytes of the grammar's paragraphs (ASCII)."""
    grammar, pieces, total = Grammar(SplitMix64(seed)), [], 0
    while total < size:
        pieces.append(grammar.paragraph().encode("ascii"))
        total += len(pieces[-1])
    return b"".join(pieces)[:size]


@dataclass
class TextSplit:
    train: torch.Tensor       # int64 byte tokens
    validation: torch.Tensor


def split_bytes(data: bytes, validation_fraction: float = 0.05) -> TextSplit:
    """`data` as byte tokens, the last `validation_fraction` held out."""
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    cut = int(len(tokens) * (1 - validation_fraction))
    return TextSplit(tokens[:cut], tokens[cut:])


def load_corpus(size: int = CORPUS_BYTES, validation_fraction: float = 0.05) -> TextSplit:
    """The corpus as byte tokens, the last `validation_fraction` held out."""
    return split_bytes(corpus(size), validation_fraction)


def windows(tokens: torch.Tensor, length: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` random windows of `length` + 1 tokens (inputs and next-token targets)."""
    starts = torch.randint(0, len(tokens) - length - 1, (count,), generator=generator)
    return torch.stack([tokens[s:s + length + 1] for s in starts.tolist()])
