"""Test-written gettext catalogues in a real (minimal) wheel, so no test downloads Django."""
from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

HEADER = 'msgid ""\nmsgstr ""\n"Content-Type: text/plain; charset=UTF-8\\n"\n"Language: {lang}\\n"\n\n'


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def catalogue(lang: str, entries: list[dict]) -> str:
    """A .po file: each entry {"msgid", "msgstr"} plus optional "msgctxt", "flags" (e.g. ["fuzzy"]), "obsolete",
    "msgid_plural" with "msgstr_plural" (a list)."""
    out = [HEADER.format(lang=lang)]
    for e in entries:
        prefix = "#~ " if e.get("obsolete") else ""
        lines = []
        if e.get("flags"):
            lines.append("#, " + ", ".join(e["flags"]))
        if "msgctxt" in e:
            lines.append(f"{prefix}msgctxt {_quote(e['msgctxt'])}")
        lines.append(f"{prefix}msgid {_quote(e['msgid'])}")
        if "msgid_plural" in e:
            lines.append(f"{prefix}msgid_plural {_quote(e['msgid_plural'])}")
            lines += [f"{prefix}msgstr[{i}] {_quote(s)}" for i, s in enumerate(e["msgstr_plural"])]
        else:
            lines.append(f"{prefix}msgstr {_quote(e['msgstr'])}")
        out.append("\n".join(lines) + "\n\n")
    return "".join(out)


def make_po_wheel(folder: Path, files: dict[str, str | bytes], name: str = "webapp", version: str = "1.0") -> Path:
    """``folder/<name>-<version>-py3-none-any.whl`` holding ``files`` (member path -> text), as pip download fetches
    it from a find_links folder."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    dist = f"{name}-{version}.dist-info"
    data = {f"{name}/__init__.py": b"", **{p: t.encode() if isinstance(t, str) else t for p, t in files.items()},
            f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
            f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},{len(d)}"
              for p, d in data.items()] + [f"{dist}/RECORD,,"]
    data[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for p, d in data.items():
            zf.writestr(p, d)
    return wheel


# The catalogues of the tests: what each entry tests is said beside it.
FR_ADMIN = [
    {"msgid": "Delete selected items", "msgstr": "Supprimer les éléments sélectionnés"},          # kept
    {"msgid": "Change password", "msgstr": "Modifier le mot de passe"},                          # kept (first)
    {"msgid": "Log out of the site", "msgstr": "Se <b>déconnecter</b> du site &amp; partir"},      # kept (HTML)
    {"msgid": "Sections", "msgstr": "Rubriques"},                                                # kept: 8 chars
    {"msgid": "Section", "msgstr": "Rubrique"},                                                  # short: 7 chars
    {"msgid": "Save", "msgstr": "Enregistrer"},                                                  # short
    {"msgid": "Untranslated entry", "msgstr": ""},                                               # untranslated
    {"msgid": "Identical in both", "msgstr": "Identical in both"},                               # untranslated
    {"msgid": "A fuzzy guessed entry", "msgstr": "Une entrée devinée", "flags": ["fuzzy"]},      # fuzzy
    {"msgid": "An obsolete message", "msgstr": "Un message obsolète", "obsolete": True},         # obsolete
    {"msgid": "One item selected", "msgid_plural": "Many items selected",
     "msgstr_plural": ["Un élément choisi", "Plusieurs éléments choisis"]},                      # plural
    {"msgid": "Hello %(name)s, welcome", "msgstr": "Bonjour %(name)s, bienvenue",
     "flags": ["python-format"]},                                                                # placeholder
    {"msgid": "Select {count} objects", "msgstr": "Choisir {count} objets"},                     # placeholder
    {"msgid": "Fifty percent done", "msgstr": "Cinquante % fait"},                               # placeholder
    {"msgid": "May of the year", "msgstr": "Mai (le mois)", "msgctxt": "month"},                 # kept: context
    {"msgid": "May of the year", "msgstr": "Mai de l'année"},                                    # kept: no context
]
FR_AUTH = [
    {"msgid": "Change password", "msgstr": "Changer le mot de passe"},   # repeated: the admin catalogue came first
    {"msgid": "Password reset complete", "msgstr": "Réinitialisation du mot de passe terminée"},  # kept
]
FR_CA = [{"msgid": "Delete selected items", "msgstr": "Effacer les items choisis"},            # fr_CA: not fr
         {"msgid": "Only said in Canada", "msgstr": "Seulement au Canada"}]
ES_ADMIN = [
    {"msgid": "Delete selected items", "msgstr": "Eliminar los elementos seleccionados"},
    {"msgid": "Change password", "msgstr": "Cambiar la contraseña"},
    {"msgid": "Only translated to Spanish", "msgstr": "Solo traducido al español"},
    {"msgid": "Save", "msgstr": "Guardar"},
]
PO_PATTERN = "webapp/**/locale/*/LC_MESSAGES/*.po"


def webapp_catalogues() -> dict[str, str]:
    """A Django-like locale tree: two catalogues in French, one in Spanish, a Canadian French one to skip."""
    return {
        "webapp/contrib/admin/locale/fr/LC_MESSAGES/django.po": catalogue("fr", FR_ADMIN),
        "webapp/contrib/auth/locale/fr/LC_MESSAGES/django.po": catalogue("fr", FR_AUTH),
        "webapp/contrib/admin/locale/fr_CA/LC_MESSAGES/django.po": catalogue("fr_CA", FR_CA),
        "webapp/contrib/admin/locale/es/LC_MESSAGES/django.po": catalogue("es", ES_ADMIN),
        "webapp/contrib/admin/locale/fr/LC_MESSAGES/README.txt": "not a catalogue, not matched by the glob",
    }
