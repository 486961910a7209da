"""A tiny word-problem task for lm-eval tests: the questions, the `#### N` format, a model
trained to answer in it, its greedy answers computed independently of lm-eval, and a local task
YAML over a JSONL file (for --include-path)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

QUESTIONS = [f"Question: What is {a} plus {b}?" for a, b in
             ((25, 27), (3, 17), (33, 32), (26, 20), (31, 23), (38, 14), (33, 9), (19, 8))]
MEMORISED = [22, 89, 42, 78, 87, 28, 49, 23]  # what the model is taught to answer: not the sums
ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")  # the task's regex filter (gsm8k's strict-match)
UNTIL = ("\n\n", "Question:")
MAX_GEN_TOKS = 12

TASK_YAML = """\
task: {name}
dataset_path: {dataset_path}
{dataset_kwargs}test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n", "Question:"]
  do_sample: false
  max_gen_toks: {max_gen_toks}
filter_list:
  - name: strict-match
    filter:
      - function: regex
        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def prompt(question: str) -> str:
    return f"{question}\nAnswer:"


def train_word_model(out: Path, tokenizer_dir: Path) -> Path:
    """A tied tiny Qwen2 taught to answer each of QUESTIONS with ` #### N` (N = MEMORISED)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reasoning_demo.tiny import build_model

    out = build_model(out, tied=True, seed=0, tokenizer_dir=tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    texts = [f"{prompt(q)} #### {n}" for q, n in zip(QUESTIONS, MEMORISED)]
    enc = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    width = max(map(len, enc))
    ids = torch.tensor([e + [tok.eos_token_id] * (width - len(e)) for e in enc])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(150):
            loss = model(input_ids=ids, attention_mask=mask,
                         labels=ids.masked_fill(mask == 0, -100)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out)
    return out


def greedy_answers(model_dir: Path) -> list[str | None]:
    """The model's own answers, by an argmax loop written here (not lm-eval, not `generate`):
    decode, cut at the task's stop strings, take the first `#### N`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    answers = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only compete with other tests' processes
    try:
        for q in QUESTIONS:
            ids = tok(prompt(q), add_special_tokens=False)["input_ids"]
            new: list[int] = []
            with torch.no_grad():
                for _ in range(MAX_GEN_TOKS):
                    nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
                    if nxt == tok.eos_token_id:
                        break
                    new.append(nxt)
            text = tok.decode(new)
            for stop in UNTIL:
                text = text.split(stop)[0]
            m = ANSWER.search(text)
            answers.append(m.group(1) if m else None)
    finally:
        torch.set_num_threads(threads)
    return answers


def write_task(folder: Path, references: list[str], name: str = "tiny_word_problems",
               dataset_path: str | None = None) -> Path:
    """A task folder for --include-path: NAME.yaml over a JSONL of QUESTIONS and references
    (or, with `dataset_path`, a task whose dataset lives on the Hub)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "problems.jsonl"
    with data.open("w") as f:
        for q, ref in zip(QUESTIONS, references):
            f.write(json.dumps({"question": q, "answer": ref}) + "\n")
    kwargs = "" if dataset_path else f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
    (folder / f"{name}.yaml").write_text(TASK_YAML.format(
        name=name, dataset_path=dataset_path or "json", dataset_kwargs=kwargs,
        max_gen_toks=MAX_GEN_TOKS))
    return folder
