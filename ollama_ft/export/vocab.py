"""Tokenizer metadata for GGUF: tokens, types, merges, special ids, BOS policy, chat template,
and the llama.cpp pre-tokenizer name.

The pre-tokenizer is identified from the tokenizer's own split rules (tokenizer.json
`pre_tokenizer`), not from a hash of a sample tokenization: a hash breaks whenever a
tokenizer file is re-serialised (DEEPSEEK.md). Each entry of `PRE_TOKENIZERS` is the exact
sequence of splits a DeepSeek family ships, and the name llama.cpp (and so Ollama) uses for
the same splits (src/llama-vocab.cpp). Anything else is refused: a guessed pre-tokenizer
tokenizes differently from training, silently.

Only byte-level BPE tokenizers (tokenizer.json) are handled: every DeepSeek family uses one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ollama_ft.chat_formats import CODER_DEFAULT_SYSTEM, ChatFormat, Message
from ollama_ft.export.errors import TokenizerError

# --- split rules, exactly as the DeepSeek tokenizer.json files write them -----------------
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LINE_BREAK = "[\r\n]"  # real CR and LF characters
CJK = "[一-龥ࠀ-一가-\ud7ff]+"
CODER_LETTERS = r"\s?\p{L}+"
CODER_PUNCT = r"\s?\p{P}+"
LLM_LETTERS = ('\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ'
               '-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-'
               'ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+')
LLM_PUNCT = "\\s?[!-/:-~！-／：-～‘-‟\u3000-。]+"
TRAILING_SPACE = r"\s+$"
V3_DIGITS = r"\p{N}{1,3}"
V3_CJK = "[一-龥\u3040-ゟ゠-ヿ]+"
V3_WORDS = ("[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?"
            "[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+")

DIGITS = ("digits", "individual")  # a `Digits` pre-tokenizer with individual_digits


@dataclass(frozen=True)
class PreTokenizer:
    name: str  # tokenizer.ggml.pre, as llama.cpp's llama-vocab.cpp spells it
    families: str  # who ships these splits
    steps: tuple  # ("split", regex) and DIGITS, in order, before the final ByteLevel


PRE_TOKENIZERS: tuple[PreTokenizer, ...] = (
    PreTokenizer("qwen2", "Qwen2/2.5/3 tokenizers: DeepSeek-R1-Distill-Qwen, DeepSeek-R1-0528-Qwen3",
                 (("split", QWEN2_SPLIT),)),
    # the same regex is also llama.cpp's "smaug-bpe" and "dbrx"; "llama-bpe" is the one that
    # also turns on ignore_merges, as the Llama 3 tokenizer.json does
    PreTokenizer("llama-bpe", "Llama 3 tokenizer: DeepSeek-R1-Distill-Llama", (("split", LLAMA3_SPLIT),)),
    PreTokenizer("deepseek-coder", "deepseek-coder 1.3b/6.7b/33b",
                 (("split", LINE_BREAK), ("split", CODER_LETTERS), ("split", CODER_PUNCT),
                  ("split", CJK), DIGITS)),
    PreTokenizer("deepseek-llm", "deepseek-llm 7b/67b, deepseek-coder 7b v1.5, DeepSeek-V2",
                 (("split", LINE_BREAK), ("split", LLM_LETTERS), ("split", LLM_PUNCT),
                  ("split", TRAILING_SPACE), ("split", CJK), DIGITS)),
    PreTokenizer("deepseek-v3", "DeepSeek-V3 and R1 (671B)",
                 (("split", V3_DIGITS), ("split", V3_CJK), ("split", V3_WORDS))),
)

# added tokens that are control tokens even when tokenizer.json does not flag them special
# (deepseek-coder's <|User|>, R1's <｜User｜>, <pad>): llama.cpp's converter treats them the same
def looks_special(text: str) -> bool:
    return (text == "<pad>" or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>")))


def _describe(steps) -> str:
    return " then ".join("digits one by one" if s == DIGITS else f"split {s[1]!r}" for s in steps)


def pre_tokenizer_steps(tokenizer_json: dict, where: str) -> tuple:
    """The pre-tokenizer of a tokenizer.json as a tuple of steps (see PreTokenizer.steps)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    items = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    steps = []
    for i, p in enumerate(items):
        kind = p.get("type")
        if kind == "ByteLevel" and i == len(items) - 1:
            if p.get("use_regex", True) or p.get("add_prefix_space", False):
                steps.append(("bytelevel", f"use_regex={p.get('use_regex', True)}, "
                                           f"add_prefix_space={p.get('add_prefix_space')}"))
            continue
        if kind == "Split" and p.get("behavior") == "Isolated" and not p.get("invert"):
            pattern = p.get("pattern") or {}
            steps.append(("split", pattern.get("Regex", pattern.get("String"))))
        elif kind == "Digits" and p.get("individual_digits"):
            steps.append(DIGITS)
        else:
            steps.append((str(kind).lower(), json.dumps(p, ensure_ascii=False)))
    if not items or items[-1].get("type") != "ByteLevel":
        raise TokenizerError(f"{where}: the pre-tokenizer does not end in ByteLevel; only "
                             "byte-level BPE tokenizers (all DeepSeek families) can be exported")
    return tuple(steps)


def identify_pre_tokenizer(tokenizer_json: dict, where: str) -> PreTokenizer:
    steps = pre_tokenizer_steps(tokenizer_json, where)
    for entry in PRE_TOKENIZERS:
        if entry.steps == steps:
            return entry
    known = "; ".join(f"{e.name} ({e.families})" for e in PRE_TOKENIZERS)
    raise TokenizerError(f"{where}: pre-tokenizer not recognised ({_describe(steps) or 'none'}). "
                         f"ollama-ft knows {known}. llama.cpp would split text differently from "
                         "the tokenizer the model was trained with, so export stops here; use a "
                         "base with one of these tokenizers, or report the tokenizer.json")


def _check_model(tj: dict, where: str) -> None:
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise TokenizerError(f"{where}: tokenizer model is {model.get('type')!r}"
                             f"{' with byte_fallback' if model.get('byte_fallback') else ''}; "
                             "only byte-level BPE tokenizers can be exported")
    if (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise TokenizerError(f"{where}: decoder is not ByteLevel; only byte-level BPE "
                             "tokenizers can be exported")
    norm = tj.get("normalizer")
    ok = norm is None or norm.get("type") == "NFC" or (
        norm.get("type") == "Sequence" and not norm.get("normalizers"))
    if not ok:
        raise TokenizerError(f"{where}: normalizer {json.dumps(norm)} has no llama.cpp "
                             "equivalent; export would tokenize differently from training")


# --- chat templates -----------------------------------------------------------------------
def _lit(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _jinja(*, bos: str, system_pre: str, system_post: str, no_system: str, user_pre: str,
           user_post: str, assistant_pre: str, assistant_post: str, generation: str,
           strip_think: bool, generation_no_think: str | None = None) -> str:
    strip = ("{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] -%}"
             "{%- endif -%}") if strip_think else ""
    # thinking turned off (Ollama passes chat_template_kwargs.enable_thinking to llama-server
    # when it renders this template): the reply starts after an empty think block, as our Go
    # TEMPLATE renders it with think:false
    gen = f"{{{{- {_lit(generation)} -}}}}"
    if generation_no_think is not None:
        gen = ("{%- if enable_thinking is defined and not enable_thinking -%}"
               f"{{{{- {_lit(generation_no_think)} -}}}}{{%- else -%}}{gen}{{%- endif -%}}")
    return (
        "{%- set ns = namespace(system='', n=0) -%}"
        "{%- for message in messages -%}{%- if message['role'] == 'system' -%}"
        "{%- if ns.n > 0 -%}{%- set ns.system = ns.system + '\\n\\n' -%}{%- endif -%}"
        "{%- set ns.system = ns.system + message['content'] -%}{%- set ns.n = ns.n + 1 -%}"
        "{%- endif -%}{%- endfor -%}"
        f"{{{{- {_lit(bos)} -}}}}"
        f"{{%- if ns.system -%}}{{{{- {_lit(system_pre)} + ns.system + {_lit(system_post)} -}}}}"
        f"{{%- else -%}}{{{{- {_lit(no_system)} -}}}}{{%- endif -%}}"
        "{%- for message in messages -%}"
        f"{{%- if message['role'] == 'user' -%}}"
        f"{{{{- {_lit(user_pre)} + message['content'] + {_lit(user_post)} -}}}}"
        "{%- elif message['role'] == 'assistant' -%}{%- set content = message['content'] -%}"
        f"{strip}{{{{- {_lit(assistant_pre)} + content + {_lit(assistant_post)} -}}}}"
        "{%- endif -%}{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{gen}{{%- endif -%}}"
    )


_BOS, _EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
# A Jinja template per chat format, rendering exactly what ChatFormat.render_prompt renders
# (so what the checkpoint's own template renders for conversations without tool calls). The
# exported GGUF always carries this one, never the base's: see chat_template_for.
CHAT_TEMPLATES = {
    "deepseek-r1": _jinja(bos=_BOS, system_pre="", system_post="", no_system="",
                          user_pre="<｜User｜>", user_post="", assistant_pre="<｜Assistant｜>",
                          assistant_post=_EOS, generation="<｜Assistant｜><think>\n",
                          strip_think=True,
                          generation_no_think="<｜Assistant｜><think>\n\n</think>\n\n"),
    "deepseek-r1-0528": _jinja(bos=_BOS, system_pre="", system_post="", no_system="",
                               user_pre="<｜User｜>", user_post="<｜Assistant｜>", assistant_pre="",
                               assistant_post=_EOS, generation="", strip_think=True,
                               generation_no_think="<think>\n\n</think>\n\n"),
    "deepseek-llm": _jinja(bos=_BOS, system_pre="", system_post="\n\n", no_system="",
                           user_pre="User: ", user_post="\n\n", assistant_pre="Assistant: ",
                           assistant_post=_EOS, generation="Assistant:", strip_think=False),
    "deepseek-coder": _jinja(bos=_BOS, system_pre="", system_post="",
                             no_system=CODER_DEFAULT_SYSTEM + "\n", user_pre="### Instruction:\n",
                             user_post="\n", assistant_pre="### Response:\n",
                             assistant_post="\n<|EOT|>\n", generation="### Response:\n",
                             strip_think=False),
}


def chat_template_for(base_dir: Path, fmt: ChatFormat) -> tuple[str, str]:
    """(template, where it came from) for `tokenizer.chat_template`: always ours for `fmt`.

    Ollama >= 0.30 reads capabilities from this template as well as from the Modelfile
    TEMPLATE, and when the GGUF's has more it ignores the TEMPLATE and renders the Jinja
    template in llama-server (server/images.go, shouldPreferChatTemplate). The R1 bases'
    own templates mention tool calls (the distills were never trained on tools), which is
    enough for that. Ours renders the same text for every conversation without tool calls,
    names no tools, and gives thinking exactly where our TEMPLATE does, so Ollama keeps the
    TEMPLATE, and a runtime that does render this template (llama.cpp, LM Studio,
    OLLAMA_GO_TEMPLATE=0) still renders what training saw.
    """
    return CHAT_TEMPLATES[fmt.name], f"ollama-ft ({fmt.name})"


# --- the BOS policy -----------------------------------------------------------------------
def add_bos_for(fmt: ChatFormat, bos_text: str | None) -> bool:
    """Whether llama.cpp should add BOS itself when it tokenizes a prompt.

    Training tokenized `fmt`'s rendering with add_special_tokens=False, so the model saw
    exactly the BOS the rendering writes. Every DeepSeek format writes the BOS text itself
    (as the checkpoints' own chat templates do), so llama.cpp must not add another: prompts
    rendered by the template then tokenize to exactly one BOS. A Modelfile TEMPLATE has to
    write the BOS text too.
    """
    rendered = fmt.render_prompt([Message("user", "x")])
    return not (bos_text and rendered.startswith(bos_text))


# --- everything together ------------------------------------------------------------------
@dataclass
class TokenizerMetadata:
    pre: PreTokenizer
    tokens: list[str]
    token_types: list[int]
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    add_bos: bool
    chat_template: str
    chat_template_source: str
    base_dir: Path
    n_padding: int  # [PAD{id}] entries added up to the model's vocab_size


def read_tokenizer(base_dir: Path, vocab_size: int, fmt: ChatFormat) -> TokenizerMetadata:
    import gguf

    base_dir = Path(base_dir)
    path = base_dir / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"{base_dir}: no tokenizer.json; export needs the fast (byte-level "
                             "BPE) tokenizer every DeepSeek family ships")
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise TokenizerError(f"{path}: invalid JSON ({e})") from None
    _check_model(tj, str(path))
    pre = identify_pre_tokenizer(tj, str(path))
    tokens: list[str | None] = [None] * vocab_size
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for text, i in tj["model"]["vocab"].items():
        if i >= vocab_size:
            raise TokenizerError(f"{path}: token {text!r} has id {i} but the model's vocab_size "
                                 f"is {vocab_size}: tokenizer and checkpoint do not belong "
                                 "together")
        tokens[i], types[i] = text, int(gguf.TokenType.NORMAL)
    by_content = {}
    for t in tj.get("added_tokens", []):
        i, text = t["id"], t["content"]
        if i >= vocab_size:
            raise TokenizerError(f"{path}: added token {text!r} has id {i} but the model's "
                                 f"vocab_size is {vocab_size}")
        special = t.get("special") or looks_special(text)
        tokens[i] = text
        types[i] = int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        by_content.setdefault(text, i)
    n_pad = 0
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i] = f"[PAD{i}]"
            n_pad += 1
    cfg = {}
    if (base_dir / "tokenizer_config.json").is_file():
        cfg = json.loads((base_dir / "tokenizer_config.json").read_text(encoding="utf-8"))

    def token_id(key):
        v = cfg.get(key)
        text = v.get("content") if isinstance(v, dict) else v
        return by_content.get(text) if text else None

    bos_id, eos_id = token_id("bos_token"), token_id("eos_token")
    bos_text = tokens[bos_id] if bos_id is not None else None
    eot_id = by_content.get(fmt.stops[0]) if fmt.stops else None
    if eot_id == eos_id:
        eot_id = None
    template, source = chat_template_for(base_dir, fmt)
    return TokenizerMetadata(pre, tokens, types, bos_id, eos_id, eot_id,
                             add_bos_for(fmt, bos_text), template, source, base_dir, n_pad)


def add_tokenizer_to_gguf(writer, meta: TokenizerMetadata) -> None:
    """tokenizer.* keys: gpt2 BPE model, pre, tokens, types, merges, special ids, template."""
    import gguf

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(meta.pre.name)
    writer.add_token_list(meta.tokens)
    writer.add_token_types(meta.token_types)
    special = gguf.SpecialVocab(meta.base_dir, load_merges=True, n_vocab=len(meta.tokens))
    if not special.merges:
        raise TokenizerError(f"{meta.base_dir / 'tokenizer.json'}: no BPE merges")
    # our own policy, not tokenizer_config's add_bos_token (see add_bos_for)
    special.add_special_token = {"bos": meta.add_bos, "eos": False}
    special.chat_template = meta.chat_template
    if meta.bos_id is not None:
        special.special_token_ids["bos"] = meta.bos_id
    if meta.eos_id is not None:
        special.special_token_ids["eos"] = meta.eos_id
    special.add_to_gguf(writer, quiet=True)
    if meta.eot_id is not None:
        writer.add_eot_token_id(meta.eot_id)
