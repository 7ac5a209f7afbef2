"""A small byte-level BPE tokenizer trained offline on a built-in corpus.

Tests need a real Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json with a
chat template, special_tokens_map.json) without downloading anything. The tokenizer is trained
with the `tokenizers` library on a deterministic generated corpus, so the same inputs always give
the same files. Byte-level pre-tokenization and decoding make every string, including non-ASCII
text and emoji, encode and decode losslessly.

Encoding adds `<|begin_of_text|>` in front like Llama 3 does; the chat template renders
`bos_token` itself and is tokenized without special tokens, so a chat prompt carries one BOS.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
# Order fixes the ids: special tokens come first, so bos=0, eos=1, im_start=2, im_end=3, pad=4.
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN, PAD_TOKEN]
MODEL_MAX_LENGTH = 1024

# Qwen2's pre-tokenizer split (digits one by one) with NFC normalisation: transformers 5 rebuilds
# any `qwen2` checkpoint's tokenizer with exactly these, so using them for every architecture keeps
# `AutoTokenizer` and a plain `tokenizers.Tokenizer` on the same ids whatever the model type.
_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML with a leading BOS. `messages[i].content` is a plain string (or None next to tool calls).
# With `tools` it renders Qwen2.5's tool prompt: the tools as JSON in a system block, assistant
# `tool_calls` as <tool_call> blocks, and `tool` messages as <tool_response> blocks in a user turn.
# Conversations without tools render exactly as plain ChatML (tests depend on those bytes).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}"
    "{{ '<|im_start|>system\\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ (messages[0]['content'] or '') + '\\n\\n' }}{% endif %}"
    "{{ '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{% for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n\' }}'
    "{% endif %}"
    "{% for message in messages %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] %}"
    "{{ '<|im_start|>assistant' }}"
    "{% if message['content'] %}{{ '\\n' + message['content'] }}{% endif %}"
    "{% for tool_call in message['tool_calls'] %}"
    "{% set call = tool_call['function'] if tool_call['function'] is defined else tool_call %}"
    "{{ '\\n<tool_call>\\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' }}"
    "{% if call['arguments'] is string %}{{ call['arguments'] }}{% else %}{{ call['arguments'] | tojson }}"
    "{% endif %}"
    "{{ '}\\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% elif message['role'] == 'tool' %}"
    "{% if loop.first or loop.previtem['role'] != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\\n<tool_response>\\n' + (message['content'] or '') + '\\n</tool_response>' }}"
    "{% if loop.last or loop.nextitem['role'] != 'tool' %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _words(text: str) -> list[str]:
    return text.split("|")


_SUBJECTS = _words(
    "the cat|a model|my friend|the server|this token|every request|the scheduler|our team|a small dog|"
    "the engine|she|he|they|we"
)
_VERBS = _words(
    "runs|sees|writes|reads|caches|returns|likes|builds|sends|decodes|prefills|waits for|finds|moves"
)
_OBJECTS = _words(
    "the page|a batch|ten apples|the answer|a long story|the blue sky|some numbers|the prefix|every word|"
    "a red ball|the kv cache|the file"
)
_ENDINGS = _words(".|!|?|...|;|,")
_SYLLABLES = _words(
    "ka|lo|mi|ten|sor|vel|ra|dun|pe|qui|zor|an|el|is|ob|ur|tha|ske|pri|gon|bel|cha|dre|fu|hin|jas|nov|wex"
)
_EXTRA = [
    "héllo wörld 你好 🙂",
    "Ça va? Übermäßig schön. naïve café résumé.",
    "日本語のテキスト、中文文本，한국어 텍스트。",
    "Emoji: 🙂 😀 🚀 ✅ ❤️ — dashes – and “quotes”.",
    "def add(a: int, b: int) -> int:\n    return a + b\n",
    "for (int i = 0; i < n; ++i) { sum += x[i] * y[i]; }",
    "import torch\nx = torch.zeros(4, 8)\nprint(x.shape)\n",
    '{"name": "tandem", "version": 1, "tags": ["llm", "serving"], "ok": true, "n": null}',
    '[{"id": 1, "score": 0.5}, {"id": 2, "score": -3.25e-4}]',
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "!@#$%^&*()_+-=[]{}|;':\",./<>?`~\\",
    "\t tabs\tand   spaces\n\nnew lines\r\n",
]


def _corpus() -> list[str]:
    """Deterministic training text: sentences, numbers, code, JSON and non-ASCII snippets."""
    rng = random.Random(1234)
    lines: list[str] = []
    for _ in range(3000):
        sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        lines.append(sentence.capitalize() + rng.choice(_ENDINGS))
    for _ in range(500):
        a, b = rng.randint(0, 99999), rng.randint(0, 999)
        lines.append(f"{a} + {b} = {a + b}; {a / (b + 1):.4f}")
        lines.append(json.dumps({"id": a, "value": b, "name": rng.choice(_OBJECTS)}))
    for _ in range(1500):
        # Pseudo-words give the trainer enough distinct words for vocabularies of a few thousand.
        words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(8)]
        lines.append(" ".join(words).capitalize() + rng.choice(_ENDINGS))
    lines.extend(_EXTRA * 50)
    return lines


def _train(vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    # Byte-level offsets are trimmed first, then BOS is prepended, matching Llama 3's tokenizer.
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
                special_tokens=[(BOS_TOKEN, bos_id)],
            ),
        ]
    )
    return tokenizer


def build_tokenizer(out_dir: Path, vocab_size: int = 512) -> None:
    """Train the tiny tokenizer and write it as a Hugging Face tokenizer directory.

    Writes tokenizer.json, tokenizer_config.json (chat template, special tokens,
    `PreTrainedTokenizerFast`) and special_tokens_map.json into `out_dir` (created if needed).
    The vocabulary has at most `vocab_size` entries; the same `vocab_size` always yields
    byte-identical files.
    """
    min_size = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be at least {min_size} (256 bytes + special tokens)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _train(vocab_size)
    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=True)

    special_map = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "additional_special_tokens": [IM_START_TOKEN, IM_END_TOKEN],
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(out_dir / "special_tokens_map.json", special_map)


def special_token_ids(out_dir: Path) -> dict[str, int]:
    """Ids of the special tokens in a tokenizer written by `build_tokenizer`."""
    tokenizer = Tokenizer.from_file(str(Path(out_dir) / "tokenizer.json"))
    ids: dict[str, int] = {}
    for token in SPECIAL_TOKENS:
        token_id = tokenizer.token_to_id(token)
        assert token_id is not None, token
        ids[token] = token_id
    return ids


def tokenizer_vocab_size(out_dir: Path) -> int:
    """Number of tokens (including special tokens) in the tokenizer stored in `out_dir`."""
    return Tokenizer.from_file(str(Path(out_dir) / "tokenizer.json")).get_vocab_size()


def _write_json(path: Path, data: Mapping[str, object]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")
