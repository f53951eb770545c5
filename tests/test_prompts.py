"""The prompt kit: few-shot examples, chain-of-thought and system prompts, as chat messages and
through a real chat template (SmolLM2's, from the bundled GGUF)."""

import json

import pytest

from lmforge.checkpoints import default_model_path
from lmforge.prompts import (
    COT_INSTRUCTION,
    Example,
    FewShotTemplate,
    PromptError,
    build_messages,
    chain_of_thought,
    extract_answer,
    load_examples,
    render,
    with_system,
)
from lmforge.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer(default_model_path())


@pytest.fixture
def examples_file(tmp_path):
    p = tmp_path / "shots.jsonl"
    p.write_text(
        json.dumps({"input": "2 + 2", "output": "4"}) + "\n\n"
        + json.dumps({"input": "3 * 3", "output": "9", "reasoning": "Three threes make nine."}) + "\n"
    )  # fmt: skip
    return p


def test_build_messages_plain_and_with_system():
    assert build_messages("Hi") == [{"role": "user", "content": "Hi"}]
    assert build_messages("Hi", system="Be brief.") == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def test_few_shot_from_jsonl_become_earlier_turns(examples_file):
    msgs = build_messages("5 - 1", system="You do arithmetic.", few_shot=examples_file)
    assert msgs == [
        {"role": "system", "content": "You do arithmetic."},
        {"role": "user", "content": "2 + 2"}, {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3 * 3"}, {"role": "assistant", "content": "9"},
        {"role": "user", "content": "5 - 1"},
    ]  # fmt: skip
    assert build_messages("q", few_shot=[("a", "b")])[:2] == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]


def test_chain_of_thought_shows_reasoning_and_asks_for_an_answer_line(examples_file):
    msgs = build_messages("5 - 1", few_shot=examples_file, cot=True)
    assert msgs[0] == {"role": "system", "content": COT_INSTRUCTION}
    assert msgs[2]["content"] == "Answer: 4"
    assert msgs[4]["content"] == "Three threes make nine.\nAnswer: 9"
    assert extract_answer("Five minus one.\nSo four.\nAnswer: 4") == "4"
    assert extract_answer("answer: 1\nthen Answer:  42 ") == "42"
    assert extract_answer("no marker\nlast line") == "last line"
    added = chain_of_thought([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    assert added[0]["content"] == f"q\n\n{COT_INSTRUCTION}"


def test_template_formats_selection_and_plain_text(examples_file):
    t = FewShotTemplate(load_examples(examples_file), instruction="Compute.", input_format="Q: {input}", output_format="A: {output}")
    msgs = t.messages("1 + 1")
    assert msgs[0]["content"] == "Compute." and msgs[1]["content"] == "Q: 2 + 2" and msgs[2]["content"] == "A: 4"
    assert t.text("1 + 1") == "Compute.\n\nInput: Q: 2 + 2\nOutput: A: 4\n\nInput: Q: 3 * 3\nOutput: A: 9\n\nInput: Q: 1 + 1\nOutput:"
    many = [Example(str(i), str(i)) for i in range(10)]
    assert FewShotTemplate(many, k=3).chosen() == many[:3]
    picked = FewShotTemplate(many, k=3, seed=1).chosen()
    assert picked == FewShotTemplate(many, k=3, seed=1).chosen() and len(picked) == 3 and picked != many[:3]
    with pytest.raises(PromptError, match="input_format"):
        FewShotTemplate(many, input_format="{question}")


def test_system_helper_replaces_an_existing_one():
    msgs = with_system([{"role": "system", "content": "old"}, {"role": "user", "content": "u"}], "new")
    assert msgs == [{"role": "system", "content": "new"}, {"role": "user", "content": "u"}]


def test_renders_through_the_models_chat_template(smol, examples_file):
    text = render(smol, build_messages("5 - 1", system="You do arithmetic.", few_shot=examples_file))
    assert text == (
        "<|im_start|>system\nYou do arithmetic.<|im_end|>\n<|im_start|>user\n2 + 2<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\n3 * 3<|im_end|>\n<|im_start|>assistant\n9<|im_end|>\n"
        "<|im_start|>user\n5 - 1<|im_end|>\n<|im_start|>assistant\n"
    )


def test_templates_without_a_system_role_get_it_in_the_first_user_turn(smol):
    class NoSystem:  # like Gemma's template: raises on a system message
        def apply_chat_template(self, messages, add_generation_prompt=True):
            from lmforge.tokenizer import TokenizerError

            if any(m["role"] == "system" for m in messages):
                raise TokenizerError("System role not supported")
            return "|".join(f"{m['role']}:{m['content']}" for m in messages)

    assert render(NoSystem(), build_messages("hi", system="Be brief.")) == "user:Be brief.\n\nhi"


@pytest.mark.parametrize(
    "line, match",
    [("not json", "line 1 is not valid JSON"), ('{"input": "a"}', "needs 'input' and 'output'"),
     ('{"input": "a", "output": 3}', "must be strings"), ('{"input": "a", "output": "b", "extra": 1}', "extra")],
)  # fmt: skip
def test_bad_example_files_name_the_line(tmp_path, line, match):
    p = tmp_path / "bad.jsonl"
    p.write_text(line + "\n")
    with pytest.raises(PromptError, match=match):
        load_examples(p)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PromptError, match="holds no examples"):
        load_examples(tmp_path / "empty.jsonl")
