"""Rows, chat rendering, prompt masking and C-RLFT conditioning."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from trainers.config import DataConfig, ModelConfig, TrainConfig
from trainers.data import (
    load_rows,
    render_generation_prompt,
    split_conversation,
    step_pieces,
)
from trainers.errors import TrainerConfigError
from trainers.sft import CRLFTConfig, SFTConfig, SFTParams, build_examples


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def sft_config(tmp_path, crlft=None, **data):
    return SFTConfig(model=ModelConfig(path="m"),
                     data=DataConfig(path=str(tmp_path / "d.jsonl"), **data),
                     train=TrainConfig(output_dir=str(tmp_path / "o"), batch_size=1),
                     sft=SFTParams(max_length=128, crlft=crlft))


def test_jsonl_rows_and_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c"}\n')
    cfg = DataConfig(path=str(path))
    with pytest.raises(TrainerConfigError, match="row 1 has no field 'completion'.*"
                                                 "set data.completion_field"):
        load_rows(cfg, ("prompt", "completion"))
    assert load_rows(cfg, ("prompt",))[1] == {"prompt": "c"}
    path.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(TrainerConfigError, match="line 2 is not JSON"):
        load_rows(cfg, ())
    with pytest.raises(TrainerConfigError, match="data.path"):
        load_rows(DataConfig(path=str(tmp_path / "missing.jsonl")), ())


def test_parquet_rows(tmp_path):
    # pyarrow is in the dev extra: this test runs (no importorskip)
    import pyarrow as pa
    import pyarrow.parquet as pq

    messages = [[{"role": "user", "content": "2+2?"}], [{"role": "user", "content": "3+3?"}]]
    pq.write_table(pa.table({"prompt": ["x", "z"], "completion": ["y", "w"],
                             "messages": messages}), tmp_path / "d.parquet")
    rows = load_rows(DataConfig(path=str(tmp_path / "d.parquet")), ("prompt",))
    assert rows == [{"prompt": "x", "completion": "y", "messages": messages[0]},
                    {"prompt": "z", "completion": "w", "messages": messages[1]}]
    assert load_rows(DataConfig(path=str(tmp_path / "d.parquet"), max_examples=1),
                     ("prompt",)) == rows[:1]
    with pytest.raises(TrainerConfigError, match="row 0 has no field 'answer'"):
        load_rows(DataConfig(path=str(tmp_path / "d.parquet")), ("answer",))


def test_split_conversation_masks_prompt_and_headers(tokenizer):
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]
    segments = split_conversation(
        lambda m: tokenizer.apply_chat_template(m, tokenize=False), messages,
        lambda i, m: m["role"] == "assistant")
    # ChatML: only assistant contents and their end-of-turn are trained
    assert segments == [
        ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False),
        ("4<|im_end|>\n", True),
        ("<|im_start|>user\n3+3?<|im_end|>\n<|im_start|>assistant\n", False),
        ("6<|im_end|>\n", True)]


def test_sft_examples_mask_prompt_tokens(tmp_path, tokenizer):
    config = sft_config(tmp_path, system_prompt="Be brief.")
    [example] = build_examples([{"prompt": "What is 2 plus 3?", "completion": "5"}],
                               tokenizer, config)
    trained = [t for t, w in zip(example.ids, example.weights) if w > 0]
    assert tokenizer.decode(trained) == "5<|im_end|>\n"
    assert tokenizer.decode(example.ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert example.weights[0] == 0.0


def test_crlft_role_conditioning_and_weights(tmp_path, tokenizer):
    crlft = CRLFTConfig(class_weights={"gpt4": 1.0, "gpt35": 0.1})
    config = sft_config(tmp_path, crlft=crlft)
    rows = [{"prompt": "Hi", "completion": "Hello", "source": "gpt4"},
            {"prompt": "Hi", "completion": "Hey", "source": "gpt35"}]
    expert, weak = build_examples(rows, tokenizer, config)
    assert tokenizer.decode(expert.ids) == ("<|im_start|>gpt4 user\nHi<|im_end|>\n"
                                            "<|im_start|>gpt4 assistant\nHello<|im_end|>\n")
    assert {w for w in expert.weights if w} == {1.0}
    assert {w for w in weak.weights if w} == {0.1}
    assert tokenizer.decode([t for t, w in zip(weak.ids, weak.weights) if w]) == "Hey<|im_end|>\n"
    with pytest.raises(TrainerConfigError, match="row 0: source class 'human' .* not in"):
        build_examples([{**rows[0], "source": "human"}], tokenizer, config)


def test_crlft_system_conditioning(tmp_path, tokenizer):
    crlft = CRLFTConfig(class_weights={"gpt4": 1.0}, condition="system",
                        system_format="Source: {source}")
    [example] = build_examples([{"prompt": "Hi", "completion": "Yo", "source": "gpt4"}],
                               tokenizer, sft_config(tmp_path, crlft=crlft))
    assert tokenizer.decode(example.ids).startswith("<|im_start|>system\nSource: gpt4<|im_end|>")
    assert tokenizer.decode([t for t, w in zip(example.ids, example.weights) if w]) == \
        "Yo<|im_end|>\n"


def test_crlft_role_condition_needs_a_template_that_writes_roles(tmp_path, tokenizer):
    strict = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] in ['user', 'assistant'] %}"
                            "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}")
    config = sft_config(tmp_path, crlft=CRLFTConfig(class_weights={"gpt4": 1.0}))
    with pytest.raises(TrainerConfigError, match="use condition: system"):
        build_examples([{"prompt": "Hi", "completion": "Yo", "source": "gpt4"}], strict, config)


def test_messages_field_trains_every_assistant_turn(tmp_path, tokenizer):
    conversation = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    config = sft_config(tmp_path, messages_field="messages")
    [example] = build_examples([{"messages": conversation}], tokenizer, config)
    trained = tokenizer.decode([t for t, w in zip(example.ids, example.weights) if w])
    assert trained == "b<|im_end|>\nd<|im_end|>\n"


def test_generation_prompt(tokenizer):
    cfg = DataConfig(path="x.jsonl", system_prompt="S")
    assert render_generation_prompt(tokenizer, "Q", cfg) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert render_generation_prompt(tokenizer, "Q", DataConfig(path="x", chat=False)) == "Q"


def test_step_pieces_and_sorting_by_length():
    train = TrainConfig(output_dir="o", batch_size=4, micro_batch_size=2)
    # unshuffled: step 1 is rows 4..7; process 1 of 2 takes 6, 7 in one micro-batch of 2
    assert step_pieces(12, 1, 3, train, False, rank=1, world=2, orders={}) == [[6, 7]]
    assert step_pieces(12, 4, 3, train, False, rank=0, world=1, orders={}) == [[4, 5], [6, 7]]
    # sorted: the same rows in the step (the same batch), cut longest first
    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 0, 11, 10]
    sort = TrainConfig(output_dir="o", batch_size=4, micro_batch_size=2, sort_by_length=True)
    for step in range(3):
        plain = step_pieces(12, step, 3, train, True, 0, 1, {}, lengths)
        pieces = step_pieces(12, step, 3, sort, True, 0, 1, {}, lengths)
        assert sorted(sum(pieces, [])) == sorted(sum(plain, []))
        assert [lengths[i] for i in sum(pieces, [])] == sorted(
            (lengths[i] for i in sum(plain, [])), reverse=True)
    ascending = list(range(12))  # per process: rank 1 of 2 takes rows 6, 7 of step 1, longest first
    assert step_pieces(12, 1, 3, sort, False, 1, 2, {}, ascending) == [[7, 6]]
