"""Language codes the pipeline accepts and the Unicode script each is written in (for the clean stage's script check)."""
from __future__ import annotations

# ISO 639-1 codes. A code outside this set is almost always a typo ("eng", "sp"); say so early.
ISO_639_1 = frozenset(
    """aa ab ae af ak am an ar as av ay az ba be bg bh bi bm bn bo br bs ca ce ch co cr cs cu cv cy da de dv dz ee el
    en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr ht hu hy hz ia id ie ig ii ik io is it iu ja jv
    ka kg ki kj kk kl km kn ko kr ks ku kv kw ky la lb lg li ln lo lt lu lv mg mh mi mk ml mn mr ms mt my na nb nd ne ng
    nl nn no nr nv ny oc oj om or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd se sg si sk sl sm sn so sq sr ss st su sv
    sw ta te tg th ti tk tl tn to tr ts tt tw ty ug uk ur uz ve vi vo wa wo xh yi yo za zh zu""".split()
)

# Expected script per language, as the prefix of Unicode character names ("CYRILLIC SMALL LETTER A").
SCRIPT_OF = {
    **{code: "LATIN" for code in
       "af az br bs ca cs cy da de en eo es et eu fi fo fr fy ga gd gl hr ht hu id is it jv la lb lt lv mg mi ms mt nb"
       " nl nn no oc pl pt qu ro rm sk sl so sq sv sw tl tr uz vi wo xh yo zu ha ig".split()},
    **{code: "CYRILLIC" for code in "ru uk be bg mk sr kk ky tg mn tt ba cv".split()},
    **{code: "ARABIC" for code in "ar fa ur ps ug sd ku".split()},
    "zh": "CJK", "ja": "CJK", "ko": "HANGUL", "el": "GREEK", "he": "HEBREW", "yi": "HEBREW", "hy": "ARMENIAN",
    "ka": "GEORGIAN", "th": "THAI", "lo": "LAO", "km": "KHMER", "my": "MYANMAR", "am": "ETHIOPIC", "ti": "ETHIOPIC",
    "hi": "DEVANAGARI", "mr": "DEVANAGARI", "ne": "DEVANAGARI", "sa": "DEVANAGARI", "bn": "BENGALI", "as": "BENGALI",
    "pa": "GURMUKHI", "gu": "GUJARATI", "or": "ORIYA", "ta": "TAMIL", "te": "TELUGU", "kn": "KANNADA",
    "ml": "MALAYALAM", "si": "SINHALA", "bo": "TIBETAN", "dv": "THAANA",
}

# Scripts written without spaces between words: fertility is measured per character there, not per word.
NO_SPACE_LANGS = frozenset({"zh", "ja", "th", "lo", "km", "my", "bo"})
