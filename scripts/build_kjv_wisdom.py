"""Rebuild hfdist/data_files/kjv_wisdom.jsonl.gz, an embedded out-of-domain held-out text.

Short sayings, far from the Austen novels the demo hyperfits on: the books of Proverbs and Ecclesiastes of the
King James Version (1611), whose copyright has expired (Debian's `bible-kjv-text` copyright file). One record per
chapter: {"book", "chapter", "text"}, the chapter's verses joined by spaces (no verse numbers).
Usage: apt-get install bible-kjv && python scripts/build_kjv_wisdom.py      (the `bible` program prints the verses)
"""

import gzip
import json
import re
import subprocess
from pathlib import Path

BOOKS = {"Proverbs": ("Prov", 31), "Ecclesiastes": ("Eccl", 12)}
VERSE = re.compile(r"^\S+?\d+:\d+ (.*)$")


def chapter_text(abbreviation: str, chapter: int) -> str:
    lines = subprocess.run(
        ["bible", "-f", f"{abbreviation}{chapter}:1-{chapter}:999"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    verses = [m.group(1).strip() for m in map(VERSE.match, lines) if m]
    if not verses:
        raise SystemExit(f"no verses printed for {abbreviation} {chapter}")
    return " ".join(verses)


def main() -> None:
    out = Path(__file__).resolve().parent.parent / "hfdist" / "data_files" / "kjv_wisdom.jsonl.gz"
    records = [
        {"book": book, "chapter": chapter, "text": chapter_text(abbreviation, chapter)}
        for book, (abbreviation, chapters) in BOOKS.items()
        for chapter in range(1, chapters + 1)
    ]
    with gzip.GzipFile(out, "wb", mtime=0) as f:  # mtime 0: the same bytes on every rebuild
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
    words = sum(len(r["text"].split()) for r in records)
    print(f"{out}: {len(records)} chapters, {words} words, {out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
