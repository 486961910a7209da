"""Generated tasks for the miniature reasoning-vector experiment (`mergekit-rl demo`, issue 7).

Two task families, both generated from a seed (no data files, no network):

- arithmetic word problems, the GSM8K stand-in: a start amount changed by 2-4 steps (buy, give,
  lose, buy k bags of m), a worked solution of one equation per line and a final `#### N`
  (`ArithmeticSpec.flawed_share` of the solutions stop one step short: mixed-quality data);
- word-list instructions, the "instruct" sibling's own skill: reverse, sort, drop or swap words.

An `Example` carries the user `prompt`, the assistant `completion` (the target text) and the
reference `answer`; `Example.row()` is the row the trainers read (`prompt`, `completion`,
`answer`: the fields `trainers.rewards.exact_answer` and the SFT config defaults expect).

`make_split` gives disjoint train / test sets; the test set depends only on the seed and its
size, so recipes with different training sizes are scored on the same items.
`pretraining_corpus` mixes both families into documents for the base model. Chat rendering is
ChatML, character for character what `mergekit_rl.tiny.CHAT_TEMPLATE` produces.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

ARITHMETIC = "arithmetic"
INSTRUCTION = "instruction"
TASKS = (ARITHMETIC, INSTRUCTION)

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


@dataclass(frozen=True)
class Example:
    task: str  # ARITHMETIC or INSTRUCTION
    prompt: str  # the user message
    completion: str  # the assistant message to learn
    answer: str  # reference: the final number (arithmetic) or the whole response (instruction)

    def row(self) -> dict[str, str]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Arithmetic word problems

NAMES = (("Ann", "she"), ("Ben", "he"), ("Cara", "she"), ("Dan", "he"), ("Eva", "she"),
         ("Finn", "he"), ("Gwen", "she"), ("Hugo", "he"), ("Ivy", "she"), ("Jack", "he"))
OBJECTS = ("apples", "pens", "coins", "cards", "books", "eggs", "shells", "stamps", "marbles",
           "stickers")


@dataclass(frozen=True)
class ArithmeticSpec:
    """Difficulty knobs. Every running total stays in [0, max_total]."""

    min_steps: int = 2
    max_steps: int = 3
    max_start: int = 60  # the start amount is drawn from [10, max_start]
    max_operand: int = 40  # added / removed amounts are drawn from [2, max_operand]
    max_total: int = 99
    bags: bool = True  # allow "buys k bags of m" (a product, then a sum: two solution lines)
    # share of worked solutions that stop one step short: they leave out the last step and
    # give the total before it as the answer (`Example.answer` stays the true total). Mixed-
    # quality demonstrations, as scraped solutions are: imitation learns the flaw, a reward
    # on the final answer can remove it.
    flawed_share: float = 0.0

    def __post_init__(self):
        if not 0 <= self.flawed_share <= 1:
            raise ValueError(f"ArithmeticSpec: flawed_share must be in [0, 1], got "
                             f"{self.flawed_share}")
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"ArithmeticSpec: need 1 <= min_steps <= max_steps, got "
                             f"{self.min_steps}, {self.max_steps}")
        if not 10 <= self.max_start <= self.max_total or self.max_operand < 2:
            raise ValueError("ArithmeticSpec: need 10 <= max_start <= max_total, max_operand >= 2")


def arithmetic_example(rng: random.Random, spec: ArithmeticSpec = ArithmeticSpec()) -> Example:
    """One word problem with its worked solution, e.g.

    Ann has 23 pens. She buys 15 more. Then she gives 9 to Ben. How many pens does Ann have now?
    -> "23+15=38\\n38-9=29\\n#### 29"   (a flawed solution: "23+15=38\\n#### 38", answer 29)
    """
    (name, pronoun), obj = rng.choice(NAMES), rng.choice(OBJECTS)
    other = rng.choice([n for n, _ in NAMES if n != name])
    total = rng.randint(10, spec.max_start)
    sentences = [f"{name} has {total} {obj}."]
    lines = []
    steps = []  # (lines before the step, total before the step)
    for i in range(rng.randint(spec.min_steps, spec.max_steps)):
        steps.append((len(lines), total))
        subject = pronoun.capitalize() if i == 0 else f"Then {pronoun}"
        kinds = ["add", "sub"] + (["bags"] if spec.bags else [])
        room = spec.max_total - total
        kind = rng.choice([k for k in kinds if (k == "sub" and total >= 2)
                           or (k == "add" and room >= 2) or (k == "bags" and room >= 4)])
        if kind == "add":
            n = rng.randint(2, min(spec.max_operand, room))
            verb = rng.choice(["buys {n} more", "finds {n} more", "gets {n} more from {o}"])
            sentences.append(f"{subject} {verb.format(n=n, o=other)}.")
            lines.append(f"{total}+{n}={total + n}")
            total += n
        elif kind == "sub":
            n = rng.randint(2 if total >= 4 else 1, min(spec.max_operand, total))
            verb = rng.choice(["gives {n} to {o}", "loses {n}", "sells {n}"])
            sentences.append(f"{subject} {verb.format(n=n, o=other)}.")
            lines.append(f"{total}-{n}={total - n}")
            total -= n
        else:
            k = rng.randint(2, min(5, room // 2))
            m = rng.randint(2, min(9, room // k))
            sentences.append(f"{subject} buys {k} bags of {m} {obj}.")
            lines += [f"{k}*{m}={k * m}", f"{total}+{k * m}={total + k * m}"]
            total += k * m
    sentences.append(f"How many {obj} does {name} have now?")
    given = total
    if rng.random() < spec.flawed_share:  # stop one step short (always drawn: the problems
        # themselves do not depend on flawed_share)
        kept, given = steps[-1]
        del lines[kept:]
    lines.append(f"#### {given}")
    return Example(ARITHMETIC, " ".join(sentences), "\n".join(lines), str(total))


# ---------------------------------------------------------------------------------------------
# Word-list instructions

WORDS = ("ant", "bird", "cat", "dog", "fish", "goat", "hen", "lion", "mouse", "owl", "pig",
         "rat", "seal", "tiger", "wolf", "yak", "red", "blue", "green", "pink", "gold", "gray",
         "sun", "moon", "star", "rain", "snow", "wind", "tree", "rock")


@dataclass(frozen=True)
class InstructionSpec:
    min_words: int = 3
    max_words: int = 6
    operations: tuple[str, ...] = ("reverse", "sort", "drop", "swap")

    def __post_init__(self):
        if not 3 <= self.min_words <= self.max_words <= len(WORDS):
            raise ValueError("InstructionSpec: need 3 <= min_words <= max_words <= "
                             f"{len(WORDS)}, got {self.min_words}, {self.max_words}")
        unknown = set(self.operations) - set(OPERATIONS)
        if unknown or not self.operations:
            raise ValueError(f"InstructionSpec.operations: unknown {sorted(unknown)}; "
                             f"expected a non-empty subset of {sorted(OPERATIONS)}")


def _drop(words: list[str], rng: random.Random) -> tuple[str, list[str]]:
    victim = rng.choice(words)
    return f"Remove the word {victim}", [w for w in words if w != victim]


OPERATIONS: dict[str, Callable[[list[str], random.Random], tuple[str, list[str]]]] = {
    "reverse": lambda w, rng: ("Reverse the words", w[::-1]),
    "sort": lambda w, rng: ("Sort the words", sorted(w)),
    "drop": _drop,
    "swap": lambda w, rng: ("Swap the first and last words", [w[-1], *w[1:-1], w[0]]),
}


def instruction_example(rng: random.Random, spec: InstructionSpec = InstructionSpec()) -> Example:
    """One word-list instruction, e.g. "Sort the words: owl cat sun" -> "cat owl sun".

    Words in one list are distinct, so every instruction has exactly one right response.
    """
    words = rng.sample(WORDS, rng.randint(spec.min_words, spec.max_words))
    instruction, result = OPERATIONS[rng.choice(spec.operations)](words, rng)
    response = " ".join(result)
    return Example(INSTRUCTION, f"{instruction}: {' '.join(words)}", response, response)


# ---------------------------------------------------------------------------------------------
# Splits and the pretraining mix

Generator = Callable[[random.Random], Example]


def generator(task: str, arithmetic: ArithmeticSpec = ArithmeticSpec(),
              instruction: InstructionSpec = InstructionSpec()) -> Generator:
    """The example generator of `task` with its difficulty spec bound."""
    if task == ARITHMETIC:
        return lambda rng: arithmetic_example(rng, arithmetic)
    if task == INSTRUCTION:
        return lambda rng: instruction_example(rng, instruction)
    raise ValueError(f"task {task!r} is unknown; expected one of {', '.join(TASKS)}")


def _stream_rng(seed: int, task: str, part: str) -> random.Random:
    return random.Random(f"{seed}/{task}/{part}")  # str seeds hash deterministically


def sample_unique(make: Generator, rng: random.Random, n: int,
                  exclude: Iterable[str] = ()) -> list[Example]:
    """`n` examples with distinct prompts, none of them in `exclude`."""
    seen, out = set(exclude), []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise ValueError(f"only {len(out)} distinct prompts found for the {n} asked: the "
                             "task's problem space is too small; make the spec harder")
        example = make(rng)
        if example.prompt not in seen:
            seen.add(example.prompt)
            out.append(example)
    return out


@dataclass(frozen=True)
class Split:
    train: list[Example]
    test: list[Example]


def make_split(task: str, n_train: int, n_test: int, seed: int = 0, *,
               arithmetic: ArithmeticSpec = ArithmeticSpec(),
               instruction: InstructionSpec = InstructionSpec()) -> Split:
    """Disjoint train / test sets (no prompt in both). The test set depends only on
    (task, spec, seed, n_test); the train set also excludes it."""
    make = generator(task, arithmetic, instruction)
    test = sample_unique(make, _stream_rng(seed, task, "test"), n_test)
    train = sample_unique(make, _stream_rng(seed, task, "train"), n_train,
                          exclude=(e.prompt for e in test))
    return Split(train, test)


def pretraining_corpus(n_documents: int, seed: int = 0, *, arithmetic_share: float = 0.5,
                       exclude: Iterable[str] = (), arithmetic: ArithmeticSpec = ArithmeticSpec(),
                       instruction: InstructionSpec = InstructionSpec()) -> list[str]:
    """Documents for pretraining the base: ChatML conversations of both task families, shuffled.

    `arithmetic_share` of them are word problems with their solutions, the rest word-list
    instructions; `exclude` (the held-out test prompts) never appears.
    """
    if not 0 <= arithmetic_share <= 1:
        raise ValueError(f"arithmetic_share must be in [0, 1], got {arithmetic_share}")
    exclude = set(exclude)
    n_arith = round(n_documents * arithmetic_share)
    examples = sample_unique(generator(ARITHMETIC, arithmetic), _stream_rng(seed, ARITHMETIC,
                             "pretrain"), n_arith, exclude)
    examples += sample_unique(generator(INSTRUCTION, instruction=instruction),
                              _stream_rng(seed, INSTRUCTION, "pretrain"),
                              n_documents - n_arith, exclude)
    documents = [render_chat(e.prompt, e.completion) for e in examples]
    random.Random(f"{seed}/pretrain/shuffle").shuffle(documents)
    return documents


# ---------------------------------------------------------------------------------------------
# Chat formatting (ChatML, as mergekit_rl.tiny.CHAT_TEMPLATE renders it)

def render_prompt(prompt: str) -> str:
    """The text a model continues from: the user turn and the assistant header."""
    return f"{IM_START}user\n{prompt}{IM_END}\n{IM_START}assistant\n"


def render_chat(prompt: str, completion: str) -> str:
    """A whole single-turn conversation; the completion ends with `<|im_end|>` and a newline."""
    return f"{render_prompt(prompt)}{completion}{IM_END}\n"


# ---------------------------------------------------------------------------------------------
# Scoring

_FINAL = re.compile(r"####\s*(-?\d+)\s*$")


def response_text(generated: str) -> str:
    """The assistant's response: generated text cut at the first `<|im_end|>`."""
    return generated.split(IM_END, 1)[0]


def parse_final_answer(response: str) -> str | None:
    """The integer after `####` on the response's last line, else None.

    Strict on purpose: the answer must close the response (`... #### 29`), as in the worked
    solutions; "#### 29 apples" or a missing `####` scores 0.
    """
    match = _FINAL.search(response_text(response).strip())
    return str(int(match.group(1))) if match else None


def is_correct(response: str, example: Example) -> bool:
    """Exact match: the final number (arithmetic) or the whole stripped response (instruction)."""
    if example.task == ARITHMETIC:
        return parse_final_answer(response) == example.answer
    return response_text(response).strip() == example.answer


def solution_lines(prompt: str) -> int:
    """How many equation lines a complete worked solution of this word problem has: one per
    change, two for "buys k bags of m"."""
    changes = prompt.split(". ")[1:-1]  # between "X has N obj" and "How many ...?"
    return sum(2 if " bags of " in change else 1 for change in changes)


def is_complete(response: str, example: Example) -> bool:
    """Whether a word problem's response works every step (a flawed one stops one short),
    right or wrong in its arithmetic."""
    lines = response_text(response).strip().split("\n")
    return sum("=" in line for line in lines) == solution_lines(example.prompt)


def accuracy(responses: Sequence[str], examples: Sequence[Example]) -> float:
    """Fraction of responses that are exactly right."""
    if len(responses) != len(examples):
        raise ValueError(f"{len(responses)} responses for {len(examples)} examples")
    if not examples:
        raise ValueError("accuracy of no examples")
    return sum(is_correct(r, e) for r, e in zip(responses, examples)) / len(examples)


def write_jsonl(examples: Iterable[Example], path: Path) -> Path:
    """Rows (`task`, `prompt`, `completion`, `answer`) for the trainers' `data.path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(example.row()) + "\n")
    return path
