#!/usr/bin/env bash
# Extracts real text domains (../shared/CORPORA.md) into plain text with a deterministic held-out
# split: data/corpora/<domain>/train.txt and heldout.txt. Documents are split by a hash of their
# document key, so no held-out document is also trained on. Idempotent: a domain already
# extracted is left alone.
#   usage: scripts/corpora.sh [DOMAIN...]     (default: kjv)
#   env:   PEER_DATA (default: <repo>/data)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out_root="${PEER_DATA:-$root/data}/corpora"
domains=("$@"); [ ${#domains[@]} -eq 0 ] && domains=(kjv)

# Reads "KEY<TAB>TEXT" documents (text with \n escaped as \\n) on stdin; writes train/heldout.
# About 1 document in 20 goes to heldout, chosen by CRC-32 of the key (stable across machines).
split_documents() {
  /usr/bin/python3 -c '
import sys, zlib
out = sys.argv[1]
n = [0, 0]
with open(out + "/train.txt.tmp", "w") as tr, open(out + "/heldout.txt.tmp", "w") as ho:
    for line in sys.stdin:
        key, _, text = line.rstrip("\n").partition("\t")
        held = zlib.crc32(key.encode()) % 20 == 0
        # A blank line ends each document, so `peer-ingest --split blank-line` finds them again.
        (ho if held else tr).write(text.replace("\\n", "\n") + "\n\n")
        n[held] += 1
print(f"corpora.sh: {out}: {n[0]} train documents, {n[1]} held-out documents")
' "$1"
  mv "$1/train.txt.tmp" "$1/train.txt"
  mv "$1/heldout.txt.tmp" "$1/heldout.txt"
}

# KJV: one document per chapter, keyed by (book, chapter); verse numbers stripped.
extract_kjv() {
  command -v bible >/dev/null || { echo "corpora.sh: 'bible' missing: run scripts/setup.sh" >&2; exit 1; }
  bible -l100000 gen1:1-rev22:21 | awk '
    /^[^ \t]/ { if (key != "") print key "\t" text; key = $0; text = ""; next }
    /^[ \t]+[0-9]+ / { sub(/^[ \t]+[0-9]+ /, ""); text = (text == "" ? $0 : text "\\n" $0) }
    END { if (key != "") print key "\t" text }' | split_documents "$1"
}

for d in "${domains[@]}"; do
  dir="$out_root/$d"
  [ -s "$dir/train.txt" ] && [ -s "$dir/heldout.txt" ] && [ -e "$dir/.v2" ] && continue
  mkdir -p "$dir"
  case "$d" in
    kjv) extract_kjv "$dir" ;;
    *) echo "corpora.sh: unknown domain '$d' (known: kjv)" >&2; exit 2 ;;
  esac
  touch "$dir/.v2"  # format marker: documents separated by blank lines
done
