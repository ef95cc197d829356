"""The trimming invariant, checked: every text encodes and decodes to what the original tokenizer gives.

The expected string is the original tokenizer's own round trip, which is the text itself unless its
normalizer rewrites it (Qwen2's NFC turns ``e + U+0301`` into ``é`` before and after trimming alike).
"""

from __future__ import annotations

import random
from typing import Any

_FIXED = [
    "def f(x):\n\treturn x ** 2  # square\r\n",
    "    if a != b and c >= d:\n        raise ValueError(f'{a!r} != {b!r}')\n",
    "fn main() { println!(\"héllo, wörld\"); }",
    "SELECT * FROM t WHERE name LIKE '%ß%';",
    "<div class=\"x\">&nbsp;</div>\u00a0\u2028\u2029",
    "emoji: 😀👍🏽👨‍👩‍👧‍👦🏳️‍🌈 🇫🇷 ✅",
    "中文代码注释：计算平均值。日本語のテキスト、한국어 텍스트",
    "العربية עברית हिन्दी ไทย Ελληνικά Русский",
    "combining: e\u0301 a\u0308 o\u0302\u0323 Zalgo: Z\u0351\u0334a\u0337\u0360l\u0353g\u0350o",
    "controls: \x00\x01\x02\x07\x08\x0b\x0c\x1b[31mred\x1b[0m\x7f\x85",
    "\ufeffBOM and \U0010ffff max code point and \U0001f9ec",
    "                                spaces then\t\t\ttabs\n\n\n\nnewlines",
    "1234567890 3.14159e-10 0xDEADBEEF 0b1010 1_000_000",
    "https://example.com/a?b=c&d=%20#frag user@example.org",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|> <|fim_prefix|>",
    "",
    " ",
    "a",
    "\n",
]


def battery(n_random: int = 200, seed: int = 0) -> list[str]:
    """Fixed mixed texts plus ``n_random`` seeded strings of random code points (any plane, no surrogates)
    and binary-ish strings (random bytes decoded as latin-1 / with replacement)."""
    rng = random.Random(seed)
    out = list(_FIXED)
    for i in range(n_random):
        n = rng.randint(1, 40)
        if i % 3 == 0:
            out.append(bytes(rng.getrandbits(8) for _ in range(n)).decode("latin-1"))
        elif i % 3 == 1:
            out.append(bytes(rng.getrandbits(8) for _ in range(n)).decode("utf-8", errors="replace"))
        else:
            cps = [rng.choice((rng.randint(0, 0x7F), rng.randint(0x80, 0xD7FF), rng.randint(0xE000, 0x10FFFF)))
                   for _ in range(n)]
            out.append("".join(map(chr, cps)))
    return out


def roundtrip(tokenizer: Any, text: str) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def roundtrip_failures(trimmed: Any, original: Any, texts: list[str]) -> list[dict[str, str]]:
    """Texts whose trimmed round trip differs from the original tokenizer's (or that raise)."""
    failures = []
    for text in texts:
        expected = roundtrip(original, text)
        try:
            got = roundtrip(trimmed, text)
        except Exception as e:  # noqa: BLE001 - a raise is a failure to report, not to propagate
            failures.append({"text": text, "error": f"{type(e).__name__}: {e}"})
            continue
        if got != expected:
            failures.append({"text": text, "expected": expected, "got": got})
    return failures
