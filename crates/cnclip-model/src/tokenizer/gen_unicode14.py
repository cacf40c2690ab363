#!/usr/bin/env python3
"""Generate unicode14.rs: the Unicode tables behind cn_clip's BasicTokenizer.

cn_clip 1.6.0 tokenizes with Python's `unicodedata` (Unicode 14.0.0 on Python 3.11) and
`str.lower()`. The `tokenizers` crate's BertNormalizer/BertPreTokenizer use Unicode 9 tables and
differ from cn_clip on ~138k code points, so the Rust tokenizer uses these tables instead. Run with
the reference interpreter (Python 3.11, the one cn_clip runs on):

    /root/.cache/cnclip-ref/venv/bin/python crates/cnclip-model/src/tokenizer/gen_unicode14.py

It overwrites unicode14.rs next to this script; the output is deterministic.
"""
import os
import sys
import unicodedata as ud

assert ud.unidata_version == "14.0.0", ud.unidata_version

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "unicode14.rs")
VOCAB = os.path.join(HERE, "..", "..", "assets", "vocab.txt")

CPS = [cp for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF]
SIGMA = 0x3A3
HANGUL = range(0xAC00, 0xD7A4)


def cat(cp):
    return ud.category(chr(cp))


# bert_tokenizer.py: _clean_text drops these ...
def is_drop(cp):
    c = chr(cp)
    if cp in (0, 0xFFFD):
        return True
    if c in "\t\n\r":
        return False
    return cat(cp) in ("Cc", "Cf")


# ... and maps these to " " (_is_whitespace).
def is_to_space(cp):
    return chr(cp) in " \t\n\r" or cat(cp) == "Zs"


def is_punct(cp):  # _is_punctuation
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return cat(cp).startswith("P")


def is_py_space(cp):  # str.split() / str.strip()
    return chr(cp).isspace()


# Final_Sigma context as CPython's handle_capital_sigma sees it, probed through str.lower().
def is_case_ignorable(cp):
    c = chr(cp)
    return ("A" + c + "\u03a3").lower()[-1] == "\u03c2" and ("1" + c + "\u03a3").lower()[-1] == "\u03c3"


def is_cased(cp):
    # Only consulted for characters that are not case-ignorable (CPython skips those first).
    return ("1" + chr(cp) + "\u03a3").lower()[-1] == "\u03c2"


def fold(c):  # token.lower() then _run_strip_accents, for one character
    return "".join(x for x in ud.normalize("NFD", c.lower()) if ud.category(x) != "Mn")


def ranges(pred):
    out = []
    for cp in CPS:
        if pred(cp):
            if out and out[-1][1] == cp - 1:
                out[-1][1] = cp
            else:
                out.append([cp, cp])
    return out


def lit(cp):
    return "'\\u{%x}'" % cp


def s_lit(s):
    return '"' + "".join("\\u{%x}" % ord(x) for x in s) + '"'


def emit_items(f, items):
    line = "   "
    for item in items:
        if len(line) + 1 + len(item) > 99:
            f.write(line + "\n")
            line = "   "
        line += " " + item
    if line.strip():
        f.write(line + "\n")


def emit_table(f, name, ty, doc, pairs):
    f.write("/// %s\n" % doc)
    f.write("pub(super) static %s: &[%s] = &[\n" % (name, ty))
    emit_items(f, ["(%s, %s)," % p for p in pairs])
    f.write("];\n\n")


def emit_ranges(f, name, doc, rs):
    emit_table(f, name, "(char, char)", doc, [(lit(lo), lit(hi)) for lo, hi in rs])


def main():
    # --- sanity checks behind the shortcuts the Rust side takes ---------------------------------
    vocab_chars = set()
    with open(VOCAB, encoding="utf-8") as fh:
        for line in fh:
            vocab_chars.update(line.strip())
    # Lowercasing is idempotent, so the dataset path's extra lower() changes nothing by itself.
    for cp in CPS:
        low = chr(cp).lower()
        assert low.lower() == low, hex(cp)
    # Per-character folding equals folding the token, except for canonical reordering among
    # non-Mn characters with a non-zero combining class. None of those is in the vocab, so a word
    # holding one is [UNK] whatever their order.
    reorderable = [cp for cp in CPS if ud.combining(chr(cp)) and cat(cp) != "Mn"]
    assert not any(chr(cp) in vocab_chars for cp in reorderable), reorderable
    assert all(ud.combining(chr(cp)) == 0 for cp in CPS if is_punct(cp))
    # Separators left after cleaning bound the sigma context exactly like a token boundary.
    for cp in CPS:
        if is_py_space(cp) and not is_drop(cp):
            assert not is_case_ignorable(cp) and not is_cased(cp), hex(cp)
    # Hangul syllables fold to their algorithmic decomposition (done in Rust, not tabulated).
    for cp in HANGUL:
        assert fold(chr(cp)) == ud.normalize("NFD", chr(cp))

    fold_empty, fold_char, fold_str, lower_char, lower_str = [], [], [], [], []
    for cp in CPS:
        c = chr(cp)
        if cp != SIGMA and cp not in HANGUL:
            g = fold(c)
            if g == "":
                fold_empty.append(cp)
            elif g != c:
                (fold_char if len(g) == 1 else fold_str).append((cp, g))
        low = c.lower()
        if cp != SIGMA and low != c:
            (lower_char if len(low) == 1 else lower_str).append((cp, low))
    fold_empty_set = set(fold_empty)

    with open(OUT, "w", encoding="utf-8", newline="\n") as f:
        f.write("// @generated by gen_unicode14.py from Python %s's unicodedata (Unicode %s).\n"
                % (sys.version.split()[0], ud.unidata_version))
        f.write("// Do not edit by hand; rerun the script.\n")
        f.write("//! Unicode %s tables reproducing cn_clip's BasicTokenizer and `str.lower()`.\n\n"
                % ud.unidata_version)
        f.write("#[cfg(test)]\n")
        f.write('pub(super) const UNICODE_VERSION: &str = "%s";\n\n' % ud.unidata_version)
        emit_ranges(f, "DROP", "`_clean_text` removes: NUL, U+FFFD, Cc and Cf except tab, LF, CR.", ranges(is_drop))
        emit_ranges(f, "TO_SPACE", "`_clean_text` maps to a space: space, tab, LF, CR and Zs.", ranges(is_to_space))
        emit_ranges(f, "PY_SPACE", "Python `str.isspace()`: where `whitespace_tokenize` splits.", ranges(is_py_space))
        emit_ranges(f, "PUNCT", "`_is_punctuation`: ASCII symbols and every P* category.", ranges(is_punct))
        emit_ranges(f, "CASE_IGNORABLE", "Case_Ignorable as CPython's Final_Sigma test sees it.", ranges(is_case_ignorable))
        emit_ranges(f, "CASED", "Cased, for characters that are not case-ignorable.",
                    ranges(lambda cp: not is_case_ignorable(cp) and is_cased(cp)))
        emit_ranges(f, "FOLD_EMPTY", "`lower()` + NFD + drop Mn leaves nothing (Σ and Hangul excluded).",
                    ranges(lambda cp: cp in fold_empty_set))
        emit_table(f, "FOLD_CHAR", "(char, char)", "`lower()` + NFD + drop Mn gives one other character.",
                   [(lit(cp), lit(ord(g))) for cp, g in fold_char])
        emit_table(f, "FOLD_STR", "(char, &str)", "`lower()` + NFD + drop Mn gives several characters.",
                   [(lit(cp), s_lit(g)) for cp, g in fold_str])
        emit_table(f, "LOWER_CHAR", "(char, char)",
                   "`str.lower()` gives one other character (not Σ: that depends on context).",
                   [(lit(cp), lit(ord(g))) for cp, g in lower_char])
        emit_table(f, "LOWER_STR", "(char, &str)", "`str.lower()` gives several characters.",
                   [(lit(cp), s_lit(g)) for cp, g in lower_str])
    print("wrote", OUT, "fold", len(fold_empty), len(fold_char), len(fold_str),
          "lower", len(lower_char), len(lower_str))


if __name__ == "__main__":
    main()
