"""Rebuild hfdist/data_files/sqlite_docs.jsonl.gz, the embedded out-of-domain held-out text.

Modern technical prose, far from the Austen novels the demo hyperfits on: the running paragraphs of a few essays
in SQLite's documentation, which its author dedicated to the public domain (Debian's `sqlite3-doc` package,
`License: public-domain` in its copyright file). One record per page: {"page", "title", "text"}, paragraphs
(``<p>`` text outside code, tables and scripts, at least 10 words) separated by a blank line.
Usage: apt-get download sqlite3-doc && dpkg -x sqlite3-doc_*.deb x &&
       python scripts/build_sqlite_docs.py x/usr/share/doc/sqlite3
"""

import gzip
import html.parser
import json
import sys
from pathlib import Path

PAGES = (
    "whentouse",
    "atomiccommit",
    "testing",
    "howtocorrupt",
    "queryplanner",
    "wal",
    "tempfiles",
    "lockingv3",
    "datatype3",
    "malloc",
    "quirks",
    "fasterthanfs",
)
SKIPPED = ("script", "style", "pre", "code", "table")


class Paragraphs(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.paragraphs, self.title, self._text, self._skip, self._in_title = [], "", None, 0, False

    def handle_starttag(self, tag, attrs):
        self._skip += tag in SKIPPED
        self._in_title = tag == "title"
        if tag == "p":
            self._text = []

    def handle_endtag(self, tag):
        self._skip -= tag in SKIPPED and self._skip > 0
        self._in_title = False
        if tag == "p" and self._text is not None:
            text = " ".join("".join(self._text).split())
            if len(text.split()) >= 10:
                self.paragraphs.append(text)
            self._text = None

    def handle_data(self, data):
        if self._in_title:
            self.title += data.strip()
        elif self._text is not None and not self._skip:
            self._text.append(data)


def main(folder: str) -> None:
    out = Path(__file__).resolve().parent.parent / "hfdist" / "data_files" / "sqlite_docs.jsonl.gz"
    records = []
    for page in PAGES:
        parser = Paragraphs()
        parser.feed((Path(folder) / f"{page}.html").read_text(errors="replace"))
        records.append({"page": page, "title": parser.title, "text": "\n\n".join(parser.paragraphs)})
    with gzip.GzipFile(out, "wb", mtime=0) as f:  # mtime 0: the same bytes on every rebuild
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
    words = sum(len(r["text"].split()) for r in records)
    print(f"{out}: {len(records)} pages, {words} words, {out.stat().st_size} bytes")


if __name__ == "__main__":
    main(sys.argv[1])
