"""The recipe's `chat_template`: a named template, `auto` (the models' own), or a Jinja template given as is.

mergekit's names are accepted (``alpaca``, ``chatml``, ``exaone``, ``llama3``, ``mistral``). The templates below are
suture's own texts of those formats. ``chatml`` and ``mistral`` render exactly as mergekit's; ``llama3``, ``exaone``
and ``alpaca`` render the formats as their model families write them, where mergekit's files add whitespace of their
own layout (a newline after every ``<|eot_id|>``, indentation before EXAONE's turns, ``\\n\\n`` before an Alpaca
prompt without a system message, no separator before the generation prompt).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from ..io import read_json

TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim }}"
        "{{ '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{% if messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
        "{% else %}{% set turns = messages %}{% endif %}"
        "{{ bos_token }}"
        "{% for message in turns %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('After the optional system message, conversation roles must alternate "
        "user/assistant/user/assistant/...') }}"
        "{% endif %}"
        "{% if message['role'] == 'user' and loop.first and system is defined %}"
        "{{ ' [INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'user' %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported, with the exception of an "
        "initial optional system message!') }}"
        "{% endif %}"
        "{% endfor %}"
    ),
    "exaone": (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
        "{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{{ '\\n' if message['role'] == 'user' else '[|endofturn|]\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
    "alpaca": (  # the last system message, then one block per turn, separated by blank lines
        "{% set systems = messages | selectattr('role', 'equalto', 'system') | list %}"
        "{% set headers = {'user': '### Instruction:', 'assistant': '### Response:', 'user_context': '### Input:'} %}"
        "{% set out = namespace(text=systems[-1]['content'] | trim if systems else '') %}"
        "{% for message in messages if message['role'] in headers %}"
        "{% set out.text = out.text + ('\\n\\n' if out.text else '') + headers[message['role']] + '\\n'"
        " + message['content'] | trim %}"
        "{% endfor %}"
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
        "{% set out.text = out.text + ('\\n\\n' if out.text else '') + '### Response:\\n' %}"
        "{% endif %}"
        "{{ out.text }}"
    ),
}

AUTO = "auto"


def chat_template_problem(value: str) -> str | None:
    """Why the recipe's `chat_template` value cannot be used, or None (no file is read: `auto` is checked later)."""
    if value == AUTO or value in TEMPLATES:
        return None
    if "{" not in value:
        return (f"chat_template: {value!r} is neither a known template name ({', '.join(sorted(TEMPLATES))}, or "
                f"{AUTO!r} for the models' own) nor a Jinja template.")
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # transformers moved its compiler: the template is checked when it is first used
        return None
    try:
        _compile_jinja_template(value)
    except Exception as err:  # jinja2's TemplateSyntaxError and its kin
        return f"chat_template: the Jinja template does not compile: {err}"
    return None


def model_chat_template(model_dir: str | Path) -> str | None:
    """The chat template a model directory's tokenizer carries (`chat_template.jinja`, else `tokenizer_config.json`'s
    `chat_template`, a string or a list of named templates whose `default` counts), stripped; None without one."""
    model_dir = Path(model_dir)
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text().strip() or None
    config = model_dir / "tokenizer_config.json"
    template = read_json(config, "tokenizer config").get("chat_template") if config.is_file() else None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template.strip() or None if isinstance(template, str) else None


def resolve_chat_template(value: str | None, model_dirs: Iterable[str | Path]) -> str | None:
    """The template text to write for the recipe's `chat_template` (None: keep the tokenizer donor's).

    A name gives its template; `auto` the template most of the models carry (the first model's among equally
    common ones; `model_dirs` in recipe order: base first), as mergekit's `auto`; a Jinja template is taken as is.
    """
    if not value:
        return None
    problem = chat_template_problem(value)
    if problem:
        raise ValueError(problem)
    if value != AUTO:
        return TEMPLATES.get(value, value)
    dirs = list(dict.fromkeys(str(d) for d in model_dirs))
    found = [t for t in map(model_chat_template, dirs) if t]
    if not found:
        raise ValueError(f"chat_template: auto: none of the models ({', '.join(dirs)}) has a chat template; name one "
                         f"({', '.join(sorted(TEMPLATES))}), give a Jinja template, or remove chat_template.")
    counts = Counter(found)
    return max(counts, key=lambda t: (counts[t], -found.index(t)))
