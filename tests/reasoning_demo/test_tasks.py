"""The demo's generated tasks, checked against an independent reading of the problem text."""

import random
import re

import pytest

from reasoning_demo import tasks

AMOUNT = {  # sentence pattern -> change to the running total
    r"(?:buys|finds) (\d+) more": lambda n: n,
    r"gets (\d+) more from \w+": lambda n: n,
    r"(?:gives (\d+) to \w+|loses (\d+)|sells (\d+))": lambda n: -n,
}


def totals_from_prompt(prompt: str) -> list[int]:
    """The running total after each sentence, read from the English alone."""
    sentences = prompt.split(". ")
    total = int(re.search(r"has (\d+)", sentences[0]).group(1))
    totals = [total]
    for sentence in sentences[1:-1]:
        if bags := re.search(r"buys (\d+) bags of (\d+)", sentence):
            total += int(bags.group(1)) * int(bags.group(2))
        else:
            for pattern, sign in AMOUNT.items():
                if match := re.search(pattern, sentence):
                    total += sign(int(next(g for g in match.groups() if g)))
                    break
            else:
                raise AssertionError(f"unread sentence {sentence!r}")
        totals.append(total)
    assert sentences[-1].startswith("How many")
    return totals


def check_equations(completion: str) -> list[str]:
    *equations, final = completion.split("\n")
    for line in equations:
        left, right = line.split("=")
        a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)", left).groups()
        assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] \
            == int(right), line
    assert final.startswith("#### ")
    return equations


@pytest.mark.parametrize("bags", [False, True])
def test_word_problems_are_solved_correctly(bags):
    spec = tasks.ArithmeticSpec(min_steps=1, max_steps=4, bags=bags)
    rng = random.Random(0)
    for _ in range(300):
        ex = tasks.arithmetic_example(rng, spec)
        totals = totals_from_prompt(ex.prompt)
        assert 1 <= len(totals) - 1 <= 4
        assert all(0 <= t <= spec.max_total for t in totals)
        check_equations(ex.completion)
        assert ex.answer == str(totals[-1])
        assert tasks.parse_final_answer(ex.completion) == ex.answer
        assert tasks.is_correct(ex.completion, ex)


def test_flawed_solutions_stop_one_step_short():
    spec = tasks.ArithmeticSpec(min_steps=1, max_steps=3, bags=True, flawed_share=1.0)
    rng = random.Random(1)
    for _ in range(200):
        ex = tasks.arithmetic_example(rng, spec)
        totals = totals_from_prompt(ex.prompt)
        equations = check_equations(ex.completion)
        # the answer given is the total before the last step; the reference stays the truth
        assert tasks.parse_final_answer(ex.completion) == str(totals[-2])
        assert ex.answer == str(totals[-1])
        last_step_lines = 2 if "bags of" in ex.prompt.split(". ")[-2] else 1
        assert len(equations) == sum(2 if "bags of" in s else 1
                                     for s in ex.prompt.split(". ")[1:-1]) - last_step_lines


def test_flawed_share_is_a_rate_and_leaves_the_problems_alone():
    clean = tasks.make_split(tasks.ARITHMETIC, 2000, 100, seed=3)
    mixed = tasks.make_split(tasks.ARITHMETIC, 2000, 100, seed=3,
                             arithmetic=tasks.ArithmeticSpec(flawed_share=0.6))
    assert [e.prompt for e in clean.train] == [e.prompt for e in mixed.train]
    assert [e.answer for e in clean.test] == [e.answer for e in mixed.test]
    assert all(tasks.is_correct(e.completion, e) for e in clean.train)
    wrong = sum(not tasks.is_correct(e.completion, e) for e in mixed.train) / 2000
    assert abs(wrong - 0.6) < 4 * (0.6 * 0.4 / 2000) ** 0.5
    with pytest.raises(ValueError, match="flawed_share"):
        tasks.ArithmeticSpec(flawed_share=1.5)


def test_instructions_have_one_right_response():
    rng = random.Random(2)
    seen = set()
    for _ in range(300):
        ex = tasks.instruction_example(rng)
        instruction, words = ex.prompt.split(": ")
        words = words.split()
        assert len(set(words)) == len(words)
        expected = {"Reverse the words": words[::-1], "Sort the words": sorted(words),
                    "Swap the first and last words": [words[-1], *words[1:-1], words[0]]}
        if instruction.startswith("Remove the word "):
            victim = instruction.rsplit(" ", 1)[1]
            want = [w for w in words if w != victim]
        else:
            want = expected[instruction]
        seen.add(instruction.split(" the word ")[0])
        assert ex.completion == ex.answer == " ".join(want)
    assert len(seen) == 4


def test_splits_are_disjoint_and_the_corpus_never_holds_a_test_item():
    split = tasks.make_split(tasks.ARITHMETIC, 500, 200, seed=0)
    assert not {e.prompt for e in split.train} & {e.prompt for e in split.test}
    assert len({e.prompt for e in split.train}) == 500
    bigger = tasks.make_split(tasks.ARITHMETIC, 900, 200, seed=0)
    assert [e.prompt for e in bigger.test] == [e.prompt for e in split.test]
    docs = tasks.pretraining_corpus(400, seed=0, arithmetic_share=0.25,
                                    exclude=[e.prompt for e in split.test])
    assert sum("How many" in d for d in docs) == 100
    test_prompts = {e.prompt for e in split.test}
    assert not any(d.split("\n")[1].removesuffix(tasks.IM_END) in test_prompts for d in docs)
    assert all(d.startswith(tasks.render_prompt(d.split("\n")[1].removesuffix(tasks.IM_END)))
               for d in docs)


def test_scoring_is_strict():
    ex = tasks.Example(tasks.ARITHMETIC, "p", "c", "29")
    assert tasks.is_correct("23+15=38\n38-9=29\n#### 29<|im_end|>junk", ex)
    assert tasks.is_correct("#### 029", ex)
    assert not tasks.is_correct("#### 29 apples", ex)
    assert not tasks.is_correct("the answer is 29", ex)
    assert not tasks.is_correct("#### 28", ex)
    assert tasks.accuracy(["#### 29", "#### 3"], [ex, ex]) == 0.5
    with pytest.raises(ValueError, match="2 responses for 1"):
        tasks.accuracy(["a", "b"], [ex])


def test_a_complete_solution_works_every_step():
    spec = tasks.ArithmeticSpec(min_steps=1, max_steps=4, bags=True, flawed_share=0.5)
    rng = random.Random(4)
    for _ in range(300):
        ex = tasks.arithmetic_example(rng, spec)
        flawed = not tasks.is_correct(ex.completion, ex)
        assert tasks.is_complete(ex.completion, ex) != flawed  # flawed ones stop short
    ex = tasks.Example(tasks.ARITHMETIC, "Ann has 23 pens. She buys 15 more. Then she gives 9 "
                       "to Ben. How many pens does Ann have now?", "", "29")
    assert tasks.solution_lines(ex.prompt) == 2
    assert tasks.is_complete("23+15=38\n38-9=30\n#### 30<|im_end|>\n1=1", ex)  # wrong, complete
    assert not tasks.is_complete("23+15=38\n#### 38", ex)
