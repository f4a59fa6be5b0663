"""examples/translation/ui_strings_corpus.py on the fixture catalogs of tests/fixtures/ui_strings_fr, installed as a fake
distribution in a temporary folder (no pip, no network): which pairs survive, the split, the manifest, the errors."""

import hashlib
import json
import random
import shutil
import sys
from pathlib import Path

import polib
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "translation"))
import ui_strings_corpus as corpus  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "ui_strings_fr"
MAX_CHARS = 80  # the fixture's long help text is longer than this

EXPECTED = {
    ("Save", "Enregistrer"),
    ("%(count)s item", "%(count)s élément"),  # a plural message: its singular and msgstr[0]
    ("Welcome, {name}!", "Bienvenue, {name} !"),
    ("Warning: this cannot be undone & is final.", "Attention : cette action est irréversible & définitive."),
    ("First line second line", "Première ligne deuxième ligne"),  # <br>: a space
    ("Search the site", "Rechercher dans le site"),
    ("Name:", "Nom :"),  # the no-break space is a space
    ("50% off", "50 % de réduction"),  # "% d" is French text, not a placeholder
    ("Close", "Fermer"),  # twice in django.po against plone's "Clore" once
    ("Open", "Afficher"),  # "Ouvrir" once, "Afficher" once: the tie goes to the smaller string
    ("Add new group", "Ajouter un groupe"),  # plone: the English of its Default comment
    ("${count} results", "${count} résultats"),
    ("Run %1", "Exécuter %1"),  # from the compiled jupyter.mo
}
EXPECTED_DROPPED = {
    "fuzzy": 1,  # "Delete" (jupyter's fuzzy message is not compiled into its .mo)
    "obsolete": 1,
    "untranslated": 1,
    "placeholders": 5,  # %(name)s, {2}, %d/%s, ${nom}, %1
    "identical": 1,  # Email/email
    "no_text": 1,
    "too_long": 1,
    "message_id": 1,  # label_no_default
    "duplicate": 1,  # the second "Close"
    "other_french": 2,  # Clore, Ouvrir
}
CATALOGS = {  # path in the fake distribution -> fixture; a .mo is compiled from the fixture's .po
    "fake_catalogs/locale/fr/LC_MESSAGES/django.po": "django.po",
    "fake_catalogs/locale/fr/LC_MESSAGES/django.mo": "django.po",  # beside its .po: not read
    "fake_catalogs/locale/fr/LC_MESSAGES/plone.po": "plone.po",
    "fake_catalogs/locale/fr_FR/LC_MESSAGES/jupyter.mo": "jupyter.po",
    "fake_catalogs/locale/de/LC_MESSAGES/django.po": None,  # German: not read
}


def install_fake(site: Path, version: str = "1.0", shuffle_seed: int | None = None) -> Path:
    """Lay the fixture catalogs out as an installed distribution ``fake-catalogs`` (a dist-info with a RECORD)."""
    for name, fixture in CATALOGS.items():
        path = site / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if fixture is None:
            path.write_text('msgid "Only in German"\nmsgstr "Nur auf Deutsch"\n', encoding="utf-8")
            continue
        catalog = polib.pofile(str(FIXTURES / fixture))
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(catalog)
        if name.endswith(".mo"):
            catalog.save_as_mofile(str(path))
        else:
            catalog.save(str(path))
    info = site / f"fake_catalogs-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fake-catalogs\nVersion: {version}\n")
    (info / "RECORD").write_text("".join(f"{name},,\n" for name in CATALOGS))
    return site


def pins_file(tmp_path: Path, line: str) -> Path:
    path = tmp_path / "requirements.txt"
    path.write_text(f"# pinned\n{line}\n")
    return path


def read_split(path: Path) -> list[tuple[str, str]]:
    records = [json.loads(line)["translation"] for line in path.read_text(encoding="utf-8").splitlines()]
    return [(record["en"], record["fr"]) for record in records]


def run_main(tmp_path, monkeypatch, site, *flags):
    monkeypatch.syspath_prepend(str(site))
    output = tmp_path / "out"
    code = corpus.main(["--output_dir", str(output), "--requirements", str(pins_file(tmp_path, "fake-catalogs==1.0")),
                        "--max_chars", str(MAX_CHARS), *flags])
    return code, output


def test_pairs_that_survive_and_manifest(tmp_path, monkeypatch):
    site = install_fake(tmp_path / "site")
    code, output = run_main(tmp_path, monkeypatch, site, "--validation_fraction", "0.5")
    assert code == 0
    train, validation = read_split(output / "train.json"), read_split(output / "validation.json")
    assert set(train) | set(validation) == EXPECTED and len(train) + len(validation) == len(EXPECTED)
    assert not {en for en, _ in train} & {en for en, _ in validation}
    assert train and validation
    assert all(corpus.in_validation(en, 0.5) for en, _ in validation)
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["dropped"] == dict(sorted(EXPECTED_DROPPED.items()))
    assert manifest["counts"] == {"train": len(train), "validation": len(validation)}
    (source,) = manifest["sources"]
    assert (source["package"], source["version"], source["pairs"]) == ("fake-catalogs", "1.0", len(EXPECTED) + 2)
    read = ["fake_catalogs/locale/fr/LC_MESSAGES/django.po", "fake_catalogs/locale/fr/LC_MESSAGES/plone.po",
            "fake_catalogs/locale/fr_FR/LC_MESSAGES/jupyter.mo"]
    assert [file["path"] for file in source["files"]] == read
    for file in source["files"]:
        assert file["sha256"] == hashlib.sha256((site / file["path"]).read_bytes()).hexdigest()


def test_split_is_stable_under_source_order(tmp_path):
    def build(site, order):
        (source,) = corpus.installed_sources([("fake-catalogs", "1.0")])
        files = dict(sorted(source.files.items(), reverse=order == "reversed"))
        return corpus.build_corpus([corpus.Source(source.package, source.version, files)], 0.5, MAX_CHARS)[:2]

    results = []
    for seed, order in ((None, "sorted"), (1, "reversed"), (2, "sorted")):
        site = install_fake(tmp_path / f"site{seed}", shuffle_seed=seed)
        with pytest.MonkeyPatch.context() as patch:
            patch.syspath_prepend(str(site))
            results.append(build(site, order))
    assert results[0] == results[1] == results[2]
    # The fixture's English alone, split as part of it: a catalog added or removed moves no other pair.
    solo = corpus.build_corpus([corpus.Source("solo", "0", {"django.po": FIXTURES / "django.po"})], 0.5, MAX_CHARS)
    for split, whole in zip(solo[:2], results[0]):
        assert {en for en, _ in split} <= {en for en, _ in whole}


def test_missing_package_is_one_line_naming_the_install_command(tmp_path, capsys):
    pins = pins_file(tmp_path, "no-such-catalog-package==1.0")
    assert corpus.main(["--output_dir", str(tmp_path / "out"), "--requirements", str(pins)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: no-such-catalog-package==1.0 is not installed")
    assert "pip install --no-deps -r examples/translation/ui_strings_requirements.txt" in error
    assert not (tmp_path / "out").exists()


def test_wrong_version_is_refused(tmp_path, monkeypatch, capsys):
    site = install_fake(tmp_path / "site", version="0.9")
    code, output = run_main(tmp_path, monkeypatch, site)
    assert code == 2 and not output.exists()
    assert capsys.readouterr().err.startswith("error: fake-catalogs 0.9 is installed, the corpus pins 1.0")


def test_pinned_requirements():
    names = [name for name, _ in corpus.read_pins()]
    assert names == ["Django", "Sphinx", "django-allauth", "wagtail", "Weblate", "pretix", "plone.app.locales",
                     "jupyterlab-language-pack-fr-FR"]


@pytest.mark.parametrize("english, french, same", [
    ("%(a)s and %(b)s", "%(b)s et %(a)s", True),  # reordered named placeholders
    ("%s of %s", "%s sur %d", False),
    ("{0} {1}", "{1} {0}", True),
    ("100%% done", "100 %% fait", True),
    ("$count files", "$nombre fichiers", False),
])
def test_placeholders(english, french, same):
    assert (corpus.placeholders(english) == corpus.placeholders(french)) is same
