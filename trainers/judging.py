"""The generative pairwise judge as a scorer: its prompt template (the only copy), the label
tokens, reading the answer's logits, and `P̄(y ≻ y')` for batches of responses.

Pairwise-RL (https://arxiv.org/abs/2504.04950) judges "is the first response better than the
second?" with a generative model. The paper's prompt and scoring details are not public; the
template and the choices below are **ours**, reconstructed from its abstract, GenRM
(https://arxiv.org/abs/2408.15240, P("Yes") of the answer token) and RLHFlow's pair-pm (both
orders, averaged). See `trainers.losses.pairwise` for the maths and where it may differ.

    judge = Judge.load("runs/judge")
    preference = judge.preference(questions, responses, anchors)   # P̄(response ≻ anchor), [n]

The same object is the GRPO reward `judge` (`judge_reward`), the `reward.judge` of `sample
pairs` / `sample rso`, and the reward of `train pairwise`. Apart from loading the model and
tokenizer, everything here is a function of tensors and token ids.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from .errors import TrainerConfigError

log = logging.getLogger(__name__)

# The judge's user turn. Pairwise-RL's own prompt is not public; this one is ours (SPEC §2).
TEMPLATE = ("Question: {question}\n{rules}Response A: {a}\nResponse B: {b}\n"
            "Is Response A better than Response B? Answer {yes} or {no}.")
# Label pairs suggested when the configured ones are not single tokens, in order of preference.
LABEL_CANDIDATES = (("Yes", "No"), ("yes", "no"), ("YES", "NO"), ("Y", "N"), ("A", "B"),
                    ("1", "0"))


@dataclass(frozen=True)
class JudgeFormat:
    """How a judgment is asked: what `train judge` trains and every scorer must repeat. A judge
    folder records it in the `judge` section of its `trainer_config.yaml`."""

    labels: tuple[str, str] = ("Yes", "No")  # the answers "A is better" / "B is better"
    rules: str | None = None  # optional principles, written after the question
    chat: bool = True  # the user turn through the tokenizer's chat template; false: plain text
    max_question_length: int = 256  # tokens; a longer question keeps its last tokens
    max_response_length: int = 256  # tokens per response; a longer one keeps its first tokens

    @classmethod
    def of(cls, section: dict | object) -> JudgeFormat:
        """The format fields of a config section (a dict or a dataclass with these fields)."""
        get = section.get if isinstance(section, dict) else \
            lambda name, default: getattr(section, name, default)
        values = {f.name: get(f.name, f.default) for f in dataclasses.fields(cls)}
        values["labels"] = tuple(values["labels"])
        return cls(**values)


def question_text(prompt) -> str:
    """A prompt (a string or chat messages) as the judge's question: the non-system contents."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(m.get("content", "")) for m in prompt if m.get("role") != "system")


def judge_prompt(question: str, a: str, b: str, fmt: JudgeFormat = JudgeFormat()) -> str:
    """The judge's user turn asking whether response `a` is better than response `b`."""
    rules = f"Rules: {fmt.rules}\n" if fmt.rules else ""
    return TEMPLATE.format(question=question, rules=rules, a=a, b=b, yes=fmt.labels[0],
                           no=fmt.labels[1])


def label_ids(tokenizer, labels: tuple[str, str], field: str) -> tuple[int, int]:
    """Token ids of the two labels; each must be one token of `tokenizer`, and they must differ.
    Raises TrainerConfigError naming `field` and suggesting labels that are single tokens."""
    ids = []
    for label in labels:
        tokens = tokenizer(label, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            good = next((f"[{y}, {n}]" for y, n in LABEL_CANDIDATES
                         if all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) == 1
                                for t in (y, n))), None)
            hint = f", e.g. {good}" if good else ""
            raise TrainerConfigError(
                f"{field}: {label!r} is {len(tokens)} tokens for this tokenizer, but the judge "
                f"answers with one token; choose labels that are single tokens{hint}")
        ids.append(tokens[0])
    if ids[0] == ids[1]:
        raise TrainerConfigError(f"{field}: both labels are token {ids[0]}; give two different "
                                 "single tokens")
    return ids[0], ids[1]


def check_tokenizer(tokenizer, fmt: JudgeFormat, field: str) -> tuple[int, int]:
    """The judge's tokenizer can ask in this format: single-token labels (-> their ids) and,
    for a chat format, a chat template."""
    ids = label_ids(tokenizer, fmt.labels, f"{field} labels")
    if fmt.chat and tokenizer.chat_template is None:
        raise TrainerConfigError(f"{field}: the judge's tokenizer has no chat template, but it "
                                 "was trained with data.chat: true; give a judge folder with its "
                                 "tokenizer files")
    return ids


def check_judge_folder(spec: str, field: str) -> None:
    """A local judge must be a causal LM's folder (it answers with a token); a Hub id is
    checked when it loads. Reads config.json only, before any weights."""
    import json

    from mergekit_rl.hub import local_path

    path = local_path(spec)
    if path is None:
        return
    if not (path / "config.json").is_file():
        raise TrainerConfigError(f"{field}: {path} is not a model folder (no config.json); give "
                                 "the output folder of `mergekit-rl train judge`")
    config = json.loads((path / "config.json").read_text())
    architectures = config.get("architectures") or []
    causal = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
    if architectures and not any(a.endswith(causal) for a in architectures):
        raise TrainerConfigError(
            f"{field}: {path} is a {architectures[0]}, not a causal LM; a generative judge "
            "answers with a token: train one with `mergekit-rl train judge` (a "
            "sequence-classification reward model goes in reward.model)")


def stored_format(spec: str) -> JudgeFormat:
    """The format a judge folder was trained with (its trainer_config.yaml), else the default."""
    import yaml

    from mergekit_rl.hub import local_path

    path = local_path(spec)
    saved = None if path is None else path / "trainer_config.yaml"
    if saved is None or not saved.is_file():
        return JudgeFormat()
    config = yaml.safe_load(saved.read_text()) or {}
    section = config.get("judge")
    if not isinstance(section, dict):
        return JudgeFormat()
    chat = (config.get("data") or {}).get("chat", True)  # `train judge` renders with data.chat
    return JudgeFormat.of({**section, "chat": chat})


def encode(tokenizer, fmt: JudgeFormat, question: str, a: str, b: str) -> list[int]:
    """Token ids of the judge's input for (question, A, B), ending where the label goes: the
    user turn through the chat template with the assistant header, or plain text and a newline.
    A long question keeps its last tokens, a long response its first."""
    def tokens(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def cut(text: str, limit: int, keep_end: bool) -> str:
        ids = tokens(text)
        if len(ids) <= limit:
            return text
        return tokenizer.decode(ids[-limit:] if keep_end else ids[:limit])

    text = judge_prompt(cut(question, fmt.max_question_length, keep_end=True),
                        cut(a, fmt.max_response_length, keep_end=False),
                        cut(b, fmt.max_response_length, keep_end=False), fmt)
    if fmt.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text += "\n"
    return tokens(text)


def next_token_logits(model, sequences: list[list[int]], pad_id: int, device) -> torch.Tensor:
    """Logits of the token after each sequence, i.e. at its last position. Sequences are
    left-padded, so that position is the last column for every row; position ids count real
    tokens only. -> [B, V] (with grad when the caller has it on)"""
    from .generation import left_pad
    from .logprobs import position_ids_from_mask

    ids, mask = left_pad(sequences, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                logits_to_keep=1, use_cache=False)
    return out.logits[:, -1]


class Judge:
    """A generative judge (model + tokenizer + format) that scores pairs of responses."""

    def __init__(self, model, tokenizer, fmt: JudgeFormat = JudgeFormat(), batch_size: int = 16,
                 field: str = "judge"):
        self.model, self.tokenizer, self.fmt, self.batch_size = model, tokenizer, fmt, batch_size
        self.yes, self.no = check_tokenizer(tokenizer, fmt, field)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
            tokenizer.eos_token_id

    @classmethod
    def load(cls, spec: str, device=None, dtype: str = "float32", batch_size: int = 16,
             fmt: JudgeFormat | None = None, field: str = "judge") -> Judge:
        """Load a judge folder (or Hub id) frozen on `device`; the format defaults to the one it
        was trained with. The folder and the labels are checked before the weights load."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        check_judge_folder(spec, field)
        fmt = fmt or stored_format(spec)
        tokenizer = AutoTokenizer.from_pretrained(spec)
        check_tokenizer(tokenizer, fmt, field)  # fail before the weights load
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=getattr(torch, dtype))
        model.to(device or "cpu").eval().requires_grad_(False)
        return cls(model, tokenizer, fmt, batch_size, field)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def encode(self, question: str, a: str, b: str) -> list[int]:
        return encode(self.tokenizer, self.fmt, question, a, b)

    def label_gaps(self, sequences: list[list[int]]) -> torch.Tensor:
        """ℓ_Yes − ℓ_No after each encoded input, in batches, without grad. -> [n] float32"""
        gaps = []
        with torch.no_grad():
            for k in range(0, len(sequences), self.batch_size):
                logits = next_token_logits(self.model, sequences[k:k + self.batch_size],
                                           self.pad_id, self.device).float()
                gaps.append(logits[:, self.yes] - logits[:, self.no])
        return torch.cat(gaps).cpu() if gaps else torch.zeros(0)

    def compare(self, questions: list[str], ys: list[str], others: list[str]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(p(y ≻ other), p(other ≻ y)) per item, both orders judged in the same batches."""
        sequences = []
        for q, y, o in zip(questions, ys, others):
            sequences += [self.encode(q, y, o), self.encode(q, o, y)]
        p = torch.sigmoid(self.label_gaps(sequences)).view(-1, 2)  # [n, 2]
        return p[:, 0], p[:, 1]

    def preference(self, questions: list[str], ys: list[str], others: list[str]
                   ) -> torch.Tensor:
        """The symmetrised P̄(y ≻ other) per item, [n]; exactly ½ where y is the other text."""
        from .losses.pairwise import symmetrised

        return symmetrised(*self.compare(questions, ys, others))


# ---------------------------------------------------------------------------------------------
# As a reward function: GRPO's `judge`, the samplers' `reward.judge`

class JudgeReward:
    """`(prompts, completions, **columns) -> P̄(completion ≻ anchor)` per completion, the anchor
    read from the column `anchor`; None where a row has no anchor. The judge loads on the first
    call (on this process's accelerator), so a config is checked without loading weights."""

    def __init__(self, model: str, anchor: str = "answer", batch_size: int = 16,
                 dtype: str = "float32", field: str = "judge"):
        check_judge_folder(model, field)
        self.spec, self.anchor, self.batch_size, self.dtype = model, anchor, batch_size, dtype
        self.field = field
        self.fmt = stored_format(model)
        from transformers import AutoTokenizer

        check_tokenizer(AutoTokenizer.from_pretrained(model), self.fmt, field)
        self._judge: Judge | None = None

    def judge(self) -> Judge:
        if self._judge is None:
            device = torch.device("cuda", torch.cuda.current_device()) \
                if torch.cuda.is_available() else torch.device("cpu")
            self._judge = Judge.load(self.spec, device, self.dtype, self.batch_size, self.fmt,
                                     self.field)
        return self._judge

    def __call__(self, prompts: list, completions: list[str], **columns) -> list[float | None]:
        if self.anchor not in columns:
            raise TrainerConfigError(
                f"{self.field}: the data has no column {self.anchor!r} to judge against "
                f"(columns: {', '.join(columns) or 'none'}); set the anchor to the field that "
                "holds the reference response")
        from .data import answer_text

        rows = [i for i, a in enumerate(columns[self.anchor]) if a is not None]
        out: list[float | None] = [None] * len(completions)
        if rows:
            preference = self.judge().preference(
                [question_text(prompts[i]) for i in rows], [completions[i] for i in rows],
                [answer_text(columns[self.anchor][i]) for i in rows])
            for i, value in zip(rows, preference.tolist()):
                out[i] = value
        return out


def judge_reward(model: str | None = None, anchor: str = "answer", batch_size: int = 16,
                 dtype: str = "float32") -> JudgeReward:
    """The GRPO reward `judge`: `{name: judge, kwargs: {model: JUDGE_FOLDER, anchor: FIELD}}`
    (a relative folder is relative to the working directory)."""
    if not model:
        raise TrainerConfigError("kwargs.model: the judge reward needs the folder of a judge "
                                 "(`mergekit-rl train judge`), e.g. kwargs: {model: runs/judge}")
    return JudgeReward(model, anchor, batch_size, dtype, "kwargs.model")


# ---------------------------------------------------------------------------------------------
# Model cards

def card_lines(config) -> list[str]:
    """What a judge judges and how to score with it (`train judge`), or which judge and anchor
    a `train pairwise` policy was trained against: the card section, as Markdown lines."""
    ours = ("Pairwise-RL (arXiv 2504.04950) does not publish its prompt, loss or value "
            "function; this design is ours, reconstructed from the abstract and the work it "
            "cites (GenRM arXiv 2408.15240, RLHFlow pair-pm).")
    if type(config).__name__ == "PairwiseConfig":
        p = config.pairwise
        anchor = {"reference": f"the row's `{p.anchor_field}`",
                  "greedy": "the starting policy's greedy response",
                  "group": "a random member of the same group"}[p.anchor]
        return ["## Reward", "",
                f"P̄(y ≻ anchor) from the judge `{p.judge}`, anchor = {anchor}; advantage "
                f"`{p.advantage}`" + (" with a critic (GAE)" if p.critic else "") + ".", "",
                ours, ""]
    fmt = config.format()
    example = judge_prompt("{question}", "{response A}", "{response B}", fmt)
    yes, no = fmt.labels
    return ["## What this judge judges", "",
            "Given a question and two responses it answers, with one token, whether the first "
            f"is better: `{yes}` (A is better) or `{no}` (B is better). Its input, "
            + ("as the user turn of the chat template (the answer is the assistant's first "
               "token):" if fmt.chat else "as plain text followed by a newline:"), "",
            "```", example, "```", "",
            f"Questions keep their last {fmt.max_question_length} tokens, responses their first "
            f"{fmt.max_response_length}. p(a≻b) = σ(ℓ_{yes} − ℓ_{no}) at the answer position; "
            "score with both orders, P̄(a≻b) = ½[p(a≻b) + 1 − p(b≻a)] (then P̄(a≻b) + P̄(b≻a) = 1 "
            f"and P̄(a≻a) = ½). Trained on both orders of every pair, loss `{config.judge.loss}`"
            + (f", consistency weight {config.judge.consistency_weight:g}"
               if config.judge.consistency_weight else "") + ". `eval/accuracy` below is the "
            "held-out pairwise accuracy of P̄, `eval/position_consistency` the mean "
            "|p(a≻b) + p(b≻a) − 1|.", "",
            "```python", "from trainers.judging import Judge",
            "judge = Judge.load(PATH)", "judge.preference(questions, responses, others)  # P̄",
            "```", "", ours, ""]
