#!/usr/bin/env python3
"""Convert Sphinx HTML documentation from Debian packages into a plain-text JSONL corpus.

Default sources: python3.11-doc (/usr/share/doc/python3.11/html, PSF License) and
python-django-doc (/usr/share/doc/python-django-doc/html, BSD-3-Clause; its release notes are
left out). Each HTML page becomes one JSON line ``{"text": ..., "source": <path>}``. Only the
page body (``role="main"``, or Django's ``id="yui-main"``) is kept; navigation, scripts,
permalink markers, Windows duplicates of console examples and index/search pages are dropped.
Paragraphs are separated by blank lines; code blocks (``<pre>``) keep their line breaks.

Usage: python scripts/pydoc_corpus.py [--html DIR ...] [--skip-dir NAME ...] --out corpus.jsonl
"""

from __future__ import annotations

import argparse
import html.parser
import json
import os
import re
import sys
from pathlib import Path

DEFAULT_HTML = ["/usr/share/doc/python3.11/html", "/usr/share/doc/python-django-doc/html"]
DEFAULT_SKIP_DIRS = ["releases"]
# Pages with no prose: indices, search, the licence text (kept out of the training data).
SKIP = {"genindex", "py-modindex", "search", "contents", "license", "copyright", "bugs", "about"}
BLOCK = {"p", "div", "section", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "pre",
         "table", "tr", "blockquote", "ul", "ol", "dl", "br", "hr", "figure", "caption"}
DROP = {"script", "style", "nav", "form", "head", "title", "button", "label"}
DROP_CLASSES = ("headerlink", "c-content-win")


class _BodyText(html.parser.HTMLParser):
    """Collects the text inside the element with role="main"."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.depth = 0          # open elements inside main (0: outside)
        self.drop = 0           # inside a dropped element
        self.pre = 0            # inside <pre>
        self.parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if self.depth == 0:
            if a.get("role") == "main" or a.get("id") == "yui-main":
                self.depth = 1
            return
        if tag not in ("br", "hr", "img", "input", "meta", "link", "wbr"):
            self.depth += 1
        cls = a.get("class") or ""
        if self.drop or tag in DROP or any(c in cls.split() for c in DROP_CLASSES):
            if tag not in ("br", "hr", "img", "input", "meta", "link", "wbr"):
                self.drop += 1
            return
        if tag == "pre":
            self.pre += 1
        if tag in BLOCK:
            self.parts.append("\n\n" if tag not in ("li", "br", "tr", "dd") else "\n")
        if tag == "li":
            self.parts.append("- ")

    def handle_endtag(self, tag):
        if self.depth == 0:
            return
        self.depth -= 1
        if self.drop:
            self.drop -= 1
            return
        if tag == "pre":
            self.pre -= 1
        if tag in BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.depth == 0 or self.drop:
            return
        if self.pre:
            self.parts.append(data)
        else:
            self.parts.append(re.sub(r"\s+", " ", data))


def page_text(raw: str) -> str:
    parser = _BodyText()
    parser.feed(raw)
    parser.close()
    text = "".join(parser.parts).replace("\u00b6", "")
    lines = [line.rstrip() for line in text.split("\n")]
    # Strip the single leading space left by whitespace collapsing at line starts outside code.
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def build(html_dirs: list[Path], out: Path, skip_dirs: list[str]) -> tuple[int, int]:
    tmp = out.with_name(out.name + ".tmp")
    n_docs = n_chars = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for html_dir in html_dirs:
            pages = sorted(p for p in html_dir.rglob("*.html")
                           if not any(part.startswith("_") or part in skip_dirs
                                      for part in p.relative_to(html_dir).parts))
            if not pages:
                raise SystemExit(f"no HTML pages under {html_dir} (apt-get install python3.11-doc python-django-doc)")
            for page in pages:
                rel = page.relative_to(html_dir).as_posix()
                if page.stem in SKIP and "/" not in rel:
                    continue
                text = page_text(page.read_text(encoding="utf-8", errors="replace"))
                if len(text) < 200:
                    continue
                fh.write(json.dumps({"text": text, "source": f"{html_dir}/{rel}"}, ensure_ascii=False) + "\n")
                n_docs += 1
                n_chars += len(text)
    os.replace(tmp, out)
    return n_docs, n_chars


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--html", action="append", type=Path, help="Sphinx HTML directory (repeatable)")
    ap.add_argument("--skip-dir", action="append", help="directory names to leave out (default: releases)")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    html_dirs = args.html or [Path(p) for p in DEFAULT_HTML]
    n_docs, n_chars = build(html_dirs, args.out, args.skip_dir if args.skip_dir is not None else DEFAULT_SKIP_DIRS)
    print(f"wrote {args.out}: {n_docs} documents, {n_chars / 1e6:.1f} M characters", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
