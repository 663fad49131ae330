#!/usr/bin/python3
"""Extracts the text domains of docs/CORPORA.md into data/corpora/<domain>/{train,heldout}.txt.

Every domain is cut into documents with a key (scripture: book and chapter; fortunes: file and
entry; code, man pages and manuals: file path; broad: source file and section). A document goes to
heldout.txt when the CRC-32 of its key is 0 mod 20 (about 5%), so the split is the same on every
machine and no held-out document is also trained on. Documents are separated by a blank line; a
domain keeps at most MAX_TRAIN_BYTES of training text and MAX_HELDOUT_BYTES held out. Run by
scripts/corpora.sh, which installs the Debian packages first.

usage: corpora.py OUT_DIR DOMAIN..."""
import glob, gzip, html.parser, io, os, re, struct, subprocess, sys, tarfile, tempfile, zlib
from concurrent.futures import ThreadPoolExecutor

MAX_TRAIN_BYTES, MAX_HELDOUT_BYTES = 16 << 20, 1 << 20


def kjv():
    out = subprocess.run(["bible", "-l100000", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    key, verses = None, []
    for line in out.splitlines():
        if line and not line[0].isspace():  # "Genesis 1": a chapter starts
            if key:
                yield key, "\n".join(verses)
            key, verses = line.strip(), []
        elif line.strip():
            verses.append(re.sub(r"^\s*\d+ ", "", line))
    if key:
        yield key, "\n".join(verses)


def sparv():
    base = "/usr/share/sword/modules/texts/ztext/spaRV1909eb/"
    notes, tags = re.compile(r"<note\b.*?</note>", re.S), re.compile(r"<[^>]*>")
    for testament in ("ot", "nt"):
        bzs, bzz, bzv = (open(base + testament + ext, "rb").read() for ext in (".bzs", ".bzz", ".bzv"))
        blocks = {}
        key, verses = None, []
        for v in range(len(bzv) // 10):
            block, offset, size = struct.unpack("<IIH", bzv[v * 10:v * 10 + 10])
            if size == 0:
                continue
            if block not in blocks:
                start, length, _ = struct.unpack("<III", bzs[block * 12:block * 12 + 12])
                blocks[block] = zlib.decompress(bzz[start:start + length])
            raw = blocks[block][offset:offset + size].decode("utf-8", "replace")
            chapter = re.search(r'<chapter\b[^>]*osisID="([^"]+)"', raw)
            if chapter:
                if key and verses:
                    yield key, "\n".join(verses)
                key, verses = chapter.group(1), []
                continue
            text = " ".join(tags.sub("", notes.sub("", raw)).split())
            if key and text:
                verses.append(text)
        if key and verses:
            yield key, "\n".join(verses)


def fortunes_de():
    for path in sorted(glob.glob("/usr/share/games/fortunes/de/*")):
        if path.endswith((".dat", ".u8")) or os.path.islink(path) or not os.path.isfile(path):
            continue
        text = open(path, encoding="utf-8", errors="replace").read()
        for i, entry in enumerate(re.split(r"^%\s*$", text, flags=re.M)):
            if entry.strip():
                yield f"{os.path.basename(path)}:{i}", entry.strip("\n")


def c_code():
    files = {}
    with tarfile.open("/usr/src/uClibc-ng-1.0.35.tar.xz", mode="r|xz") as tar:  # one pass: xz cannot seek
        for m in tar:
            if m.isfile() and m.name.endswith(".c"):
                text = tar.extractfile(m).read().decode("utf-8", "replace")
                if len(text) > 300:  # about 420 files are tiny include wrappers
                    files[m.name] = text.strip("\n")
    for name in sorted(files):
        yield name, files[name]


def man_pages():
    # The pages of the `manpages` and `manpages-dev` packages only, not whatever else is installed.
    listed = subprocess.run(["dpkg", "-L", "manpages", "manpages-dev"], capture_output=True, text=True).stdout
    pages = []
    for path in sorted(set(listed.split())):
        if not re.match(r"^/usr/share/man/man[1-8]/[^/]+\.gz$", path) or os.path.islink(path):
            continue
        with gzip.open(path, "rb") as f:
            head = f.read(4)
        if head.startswith(b".so "):
            continue
        pages.append(path)

    def render(path):
        with gzip.open(path, "rb") as f:
            src = f.read()
        r = subprocess.run(["groff", "-man", "-Tutf8", "-P-cbou"], input=src, capture_output=True,
                           env={**os.environ, "LC_ALL": "C.UTF-8"})
        return path, r.stdout.decode("utf-8", "replace")

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for path, text in pool.map(render, pages):
            text = "\n".join(line.rstrip() for line in text.splitlines()).strip("\n")
            if text:
                yield path, re.sub(r"\n{3,}", "\n\n", text)


def python_code():
    root = "/usr/lib/python3.11/"
    for path in sorted(glob.glob(root + "**/*.py", recursive=True)):
        rel = path[len(root):]
        if rel.startswith(("encodings/", "pydoc_data/", "test/")) or "/test/" in rel:
            continue
        text = open(path, encoding="utf-8", errors="replace").read().strip("\n")
        if text:
            yield rel, text


def broad():
    # The base model's pretraining text, none of the streamed domains: Perl's documentation (POD
    # source: technical English with code) and the Debian Reference (plain text), in sections of
    # ~4 KB, ordered by a hash of their key so that any prefix of train.txt mixes both sources.
    docs = []
    listed = subprocess.run(["dpkg", "-L", "perl-doc"], capture_output=True, text=True).stdout
    for path in sorted(p for p in set(listed.split()) if p.endswith(".pod") and os.path.isfile(p)):
        text = open(path, encoding="utf-8", errors="replace").read()
        docs += sections("perl:" + os.path.basename(path), text)
    with gzip.open("/usr/share/debian-reference/debian-reference.en.txt.gz", "rt", encoding="utf-8",
                   errors="replace") as f:
        docs += sections("debref", f.read())
    for key, text in sorted(docs, key=lambda d: (zlib.crc32(d[0].encode()), d[0])):
        yield key, text


def in_hash_order(docs):
    """Documents ordered by a hash of their key: any prefix of train.txt spans the whole domain
    (the large domains are cut at MAX_TRAIN_BYTES, and benchmarks train on a prefix)."""
    return sorted(docs, key=lambda d: (zlib.crc32(d[0].encode()), d[0]))


def source_files(root, patterns, skip=lambda rel: False):
    """(path under root, text) of the files matching `patterns` (.gz ones decompressed), hash order."""
    docs = []
    for pattern in patterns:
        for path in glob.glob(root + pattern, recursive=True):
            rel = path[len(root):]
            if skip(rel) or os.path.islink(path) or not os.path.isfile(path):
                continue
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8", errors="replace") as f:
                text = f.read().strip("\n")
            if text.strip():
                docs.append((rel, text))
    return in_hash_order(docs)


def go_code():
    root = sorted(glob.glob("/usr/share/go-*/src/"))[-1]
    return source_files(root, ["**/*.go"], lambda rel: rel.endswith("_test.go") or "testdata/" in rel)


def rust_code():
    root = sorted(glob.glob("/usr/src/rustc-*/library/"))[-1]
    return source_files(root, ["**/*.rs"], lambda rel: "/tests/" in rel or "/benches/" in rel)


def ruby_code():
    return source_files(sorted(glob.glob("/usr/lib/ruby/3.*/"))[-1], ["**/*.rb"])


def emacs_lisp():
    return source_files(sorted(glob.glob("/usr/share/emacs/2*/lisp/"))[-1], ["**/*.el.gz", "**/*.el"])


def latex():
    # LaTeX's own macro packages and classes (not font definitions or bitmaps).
    return source_files("/usr/share/texlive/texmf-dist/tex/latex/",
                        ["**/*." + ext for ext in ("sty", "cls", "def", "ltx", "clo", "cfg", "tex")])


class ManualPage(html.parser.HTMLParser):
    """The text of one page of the PostgreSQL manual: paragraphs and table rows on lines of their
    own (cells apart by a tab), <pre> (SQL examples, program output) as it is; the head and the
    navigation bars left out."""

    BLOCKS = {"p", "div", "br", "li", "dt", "dd", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "table",
              "blockquote"}
    PRE = "\x00"  # marks the lines of <pre> text, whose spaces are kept

    def __init__(self):
        super().__init__()
        self.parts, self.pre, self.skipping = [], 0, []  # skipping: open tags of what is left out

    def handle_starttag(self, tag, attrs):
        if self.skipping:
            self.skipping[-1][1] += tag == self.skipping[-1][0]
            return
        if tag in ("head", "script", "style") or (
                tag == "div" and dict(attrs).get("class", "") in ("navheader", "navfooter")):
            self.skipping.append([tag, 1])
            return
        self.pre += tag == "pre"
        self.parts.append("\n" if tag in self.BLOCKS else "\t" if tag in ("td", "th") else "")

    def handle_endtag(self, tag):
        if self.skipping:
            self.skipping[-1][1] -= tag == self.skipping[-1][0]
            if self.skipping[-1][1] == 0:
                self.skipping.pop()
            return
        self.pre -= tag == "pre" and self.pre > 0
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.skipping:
            return
        if self.pre:
            self.parts.append("\n".join(self.PRE + line for line in data.split("\n")))
        else:
            self.parts.append(re.sub(r"\s+", " ", data))

    def text(self):
        lines = []
        for line in "".join(self.parts).split("\n"):
            line = line.replace(self.PRE, "").rstrip() if self.PRE in line else line.strip()
            if line.strip():
                lines.append(line)
        return "\n".join(lines)


def sql_docs():
    docs = []
    for path in glob.glob("/usr/share/doc/postgresql-doc-*/html/*.html"):
        page = ManualPage()
        page.feed(open(path, encoding="utf-8", errors="replace").read())
        text = page.text()
        if len(text) > 200:
            docs.append((os.path.basename(path), text))
    return in_hash_order(docs)


def sections(name, text, size=4000):
    """Cuts text at blank lines into pieces of about `size` characters, keyed name:index."""
    out, piece = [], []
    for para in re.split(r"\n\s*\n", text):
        piece.append(para.rstrip())
        if sum(len(p) for p in piece) >= size:
            out.append("\n".join(piece).strip("\n"))
            piece = []
    if piece:
        out.append("\n".join(piece).strip("\n"))
    return [(f"{name}:{i}", t) for i, t in enumerate(out) if t]


DOMAINS = {"broad": broad, "kjv": kjv, "sparv": sparv, "fortunes-de": fortunes_de, "c-code": c_code,
           "man-pages": man_pages, "python": python_code, "go-code": go_code, "rust-code": rust_code,
           "ruby-code": ruby_code, "emacs-lisp": emacs_lisp, "latex": latex, "sql-docs": sql_docs}


def main():
    out_root, domains = sys.argv[1], sys.argv[2:]
    for d in domains:
        if d not in DOMAINS:
            sys.exit(f"corpora.py: unknown domain '{d}' (known: {', '.join(DOMAINS)})")
    for d in domains:
        out = os.path.join(out_root, d)
        os.makedirs(out, exist_ok=True)
        counts, sizes = [0, 0], [0, 0]
        with open(out + "/train.txt.tmp", "w") as tr, open(out + "/heldout.txt.tmp", "w") as ho:
            for key, text in DOMAINS[d]():
                held = zlib.crc32(key.encode()) % 20 == 0
                if sizes[held] >= (MAX_HELDOUT_BYTES if held else MAX_TRAIN_BYTES):
                    continue
                # No blank line inside a document: the blank line is the separator peer-ingest splits on.
                text = re.sub(r"\n\s*\n", "\n", text)
                (ho if held else tr).write(text + "\n\n")
                counts[held] += 1
                sizes[held] += len(text.encode()) + 2
        os.replace(out + "/train.txt.tmp", out + "/train.txt")
        os.replace(out + "/heldout.txt.tmp", out + "/heldout.txt")
        open(out + "/.v2", "w").close()
        print(f"corpora: {d}: {counts[0]} train documents ({sizes[0] / 1e6:.1f} MB), "
              f"{counts[1]} held-out ({sizes[1] / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
