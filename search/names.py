"""Names as text that PostgreSQL, terminals and pages show safely: the one
"safe display name" function, used by the importer (files, zip entries,
labels) and by dataset names (search.models)."""

from __future__ import annotations

# C0 controls (but NUL, dropped), DEL, C1 controls, and the Unicode bidi
# controls (LRM, RLM, ALM, embeddings, overrides, isolates): in a name they
# forge report lines (LF, CR), drive the terminal (ESC, OSC, BEL) or reverse
# what a reader sees (U+202E "gnp.exe"). `unzip` replaces them too.
_BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_UNSAFE = {c: "\ufffd" for c in [*range(1, 0x20), *range(0x7F, 0xA0), *map(ord, _BIDI_CONTROLS)]} | {0: None}


def printable_name(text: str) -> str:
    """A name (a file's, a zip entry's, a label) as text PostgreSQL, terminals
    and pages show safely, the one "safe display name" of the project: bytes
    that are not UTF-8 (legal in Linux file names, seen here as surrogates)
    become U+FFFD, NUL characters are dropped, every other C0/C1 control, DEL
    and bidi control character becomes U+FFFD. Never raises."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "replace")
    return raw.decode("utf-8", "replace").translate(_UNSAFE)
