"""The .po reader (format po) on test-written catalogues in a real zip wheel: each filter does its job."""
from __future__ import annotations

import stat
import zipfile
from pathlib import Path

import pytest

from tests.helpers.po_wheel import PO_PATTERN, catalogue, make_po_wheel, webapp_catalogues
from pipeline.errors import PipelineError
from pipeline.sources.lines import SegmentSink
from pipeline.sources.po import entry_key, read_po_wheel


def read(tmp_path: Path, files: dict, languages=("en", "fr", "es"), pattern: str = PO_PATTERN):
    wheel = make_po_wheel(tmp_path / "wheels", files)
    with SegmentSink(tmp_path / "raw", "webapp", list(languages)) as sink:
        entries, facts = read_po_wheel(wheel, pattern, list(languages), "en", sink, tmp_path / "scratch", "src")
    rows = {lang: dict(line.split("\t") for line in (tmp_path / "raw" / f"{lang}.tsv").read_text().splitlines())
            for lang in languages}
    return entries, facts, rows


def key(msgid: str, msgctxt: str | None = None) -> str:
    return f"webapp:{entry_key(msgctxt, msgid)}"


def test_each_filter_drops_what_it_names_and_the_rest_is_aligned_by_id(tmp_path):
    entries, facts, rows = read(tmp_path, webapp_catalogues())
    assert rows["fr"] == {
        key("Delete selected items"): "Supprimer les éléments sélectionnés",
        key("Change password"): "Modifier le mot de passe",  # the admin catalogue sorts before auth: first wins
        key("Log out of the site"): "Se <b>déconnecter</b> du site &amp; partir",  # raw: clean normalises it
        key("Sections"): "Rubriques",  # 8 characters: long enough
        key("May of the year", "month"): "Mai (le mois)",  # msgctxt is part of the id
        key("May of the year"): "Mai de l'année",
        key("Password reset complete"): "Réinitialisation du mot de passe terminée",
    }
    assert rows["es"] == {key("Delete selected items"): "Eliminar los elementos seleccionados",
                          key("Change password"): "Cambiar la contraseña",
                          key("Only translated to Spanish"): "Solo traducido al español"}
    # the English side: the msgid of every entry kept in some language, under the same id
    assert rows["en"] == {k: msgid for msgid, ctx in [
        ("Delete selected items", None), ("Change password", None), ("Log out of the site", None),
        ("Sections", None), ("May of the year", "month"), ("May of the year", None),
        ("Password reset complete", None), ("Only translated to Spanish", None)] for k in [key(msgid, ctx)]}
    assert facts["dropped"]["fr"] == {"obsolete": 1, "fuzzy": 1, "plural": 1, "untranslated": 2, "placeholder": 3,
                                      "short": 2, "repeated": 1}
    assert facts["dropped"]["es"] == {"obsolete": 0, "fuzzy": 0, "plural": 0, "untranslated": 0, "placeholder": 0,
                                      "short": 1, "repeated": 0}
    assert facts["kept"] == {"fr": 7, "es": 3}
    assert entries == 16 + 2 + 4  # every entry of the fr and es catalogues; fr_CA is not read
    # fr_CA is another language: skipped, and none of its text is anywhere
    assert facts["skipped_locales"] == ["fr_CA"]
    assert facts["catalogues"]["fr"] == ["webapp/contrib/admin/locale/fr/LC_MESSAGES/django.po",
                                         "webapp/contrib/auth/locale/fr/LC_MESSAGES/django.po"]
    everything = " ".join(text for lang in rows.values() for text in lang.values())
    assert "Canada" not in everything and "Effacer" not in everything


def test_ids_are_stable_and_rows_are_in_id_order(tmp_path):
    _, _, first = read(tmp_path / "a", webapp_catalogues())
    reordered = dict(reversed(list(webapp_catalogues().items())))  # other member order inside the zip
    _, _, second = read(tmp_path / "b", reordered)
    assert first == second
    lines = (tmp_path / "a" / "raw" / "fr.tsv").read_text().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == sorted(ln.split("\t")[0] for ln in lines)
    assert entry_key(None, "x") != entry_key("", "x") != entry_key("ctx", "x")


def test_a_language_without_a_catalogue_is_one_clear_error(tmp_path):
    with pytest.raises(PipelineError, match=r"no catalogue matching path .* for \['ru'\] \(the folder above "
                                            r"LC_MESSAGES must be the language code\)"):
        read(tmp_path, webapp_catalogues(), languages=("en", "fr", "ru"))


def test_a_broken_catalogue_names_its_member(tmp_path):
    files = {"webapp/core/locale/fr/LC_MESSAGES/django.po": 'msgid "a"\nmsgstr "b"\nthis is not po\n'}
    with pytest.raises(PipelineError, match=r"webapp-1\.0-py3-none-any\.whl:webapp/core/locale/fr/LC_MESSAGES/django\.po: "
                                            r"not a readable \.po catalogue \(Syntax error in po file \(line 3\)\)"):
        read(tmp_path, files, languages=("en", "fr"))


@pytest.mark.parametrize("member, reason", [("webapp/../locale/fr/LC_MESSAGES/x.po", "a '..' component"),
                                            ("webapp/locale/fr/LC_MESSAGES/link.po", "a symbolic link")])
def test_unsafe_members_are_refused(tmp_path, member, reason):
    wheel = make_po_wheel(tmp_path / "wheels", {"webapp/locale/fr/LC_MESSAGES/ok.po": catalogue("fr", [])})
    with zipfile.ZipFile(wheel, "a") as zf:
        info = zipfile.ZipInfo(member)
        if reason == "a symbolic link":
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with SegmentSink(tmp_path / "raw", "webapp", ["en", "fr"]) as sink, \
            pytest.raises(PipelineError, match=rf"refusing archive member '{member}': {reason}"):
        read_po_wheel(wheel, "webapp/**.po", ["en", "fr"], "en", sink, tmp_path / "scratch", "src")
