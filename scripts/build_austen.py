"""Rebuild hfdist/data_files/austen.jsonl.gz (the embedded corpus) from the plain-text novels.

One record per chapter: {"title", "chapter", "text"}, the lines of each paragraph joined with spaces and
paragraphs separated by a blank line. Front matter before the first chapter is dropped.
Usage: python scripts/build_austen.py ../shared/data/austen
"""

import gzip
import json
import re
import sys
from pathlib import Path

TITLES = {
    "emma": "Emma",
    "mansfieldpark": "Mansfield Park",
    "northangerabbey": "Northanger Abbey",
    "prideprejudice": "Pride and Prejudice",
    "sensesensibility": "Sense and Sensibility",
}
CHAPTER = re.compile(r"^(CHAPTER|Chapter) [0-9IVXLC]+\.?$")


def chapters(text: str):
    chapter, paragraphs, lines = 0, [], []
    for line in text.splitlines() + [""]:
        line = line.strip()
        if CHAPTER.match(line):
            if chapter and paragraphs:
                yield chapter, "\n\n".join(paragraphs)
            chapter, paragraphs, lines = chapter + 1, [], []
        elif not line:
            if lines and chapter and not re.fullmatch(r"(VOLUME|THE END|FINIS).*", " ".join(lines)):
                paragraphs.append(" ".join(lines))
            lines = []
        else:
            lines.append(line)
    if chapter and paragraphs:
        yield chapter, "\n\n".join(paragraphs)


def main(folder: str) -> None:
    out = Path(__file__).resolve().parent.parent / "hfdist" / "data_files" / "austen.jsonl.gz"
    records = []
    for path in sorted(Path(folder).glob("*.txt")):
        for number, text in chapters(path.read_text()):
            records.append({"title": TITLES[path.stem], "chapter": number, "text": text})
    with gzip.GzipFile(out, "wb", mtime=0) as f:  # mtime 0: the same input gives the same bytes
        f.write("".join(json.dumps(r) + "\n" for r in records).encode())
    print(f"{out}: {len(records)} chapters, {sum(len(r['text']) for r in records)} characters")


if __name__ == "__main__":
    main(sys.argv[1])
