#!/usr/bin/env bash
# Installs the Debian packages of the text domains (docs/CORPORA.md) and extracts them into
# data/corpora/<domain>/train.txt and heldout.txt with a deterministic held-out split (~5% of
# documents, by a hash of each document's key). Idempotent: a domain already extracted is skipped.
#   usage: scripts/corpora.sh [DOMAIN... | all | long]   (default: kjv)
#   domains: kjv sparv fortunes-de c-code man-pages python (the stream, `all`)
#            broad (the base model's pretraining text for `peer-bench forgetting --pretrain`)
#            go-code rust-code ruby-code emacs-lisp latex sql-docs (with `all`'s: `long`, twelve)
#   env:     PEER_DATA (default: <repo>/data)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out_root="${PEER_DATA:-$root/data}/corpora"
all=(kjv sparv fortunes-de c-code man-pages python)
more=(go-code rust-code ruby-code emacs-lisp latex sql-docs)
domains=("$@")
[ ${#domains[@]} -eq 0 ] && domains=(kjv)
[ "${domains[0]}" = all ] && domains=("${all[@]}" broad)
[ "${domains[0]}" = long ] && domains=("${all[@]}" "${more[@]}" broad)

packages_of() {
  case "$1" in
    kjv) echo bible-kjv ;;
    sparv) echo sword-text-sparv ;;
    fortunes-de) echo fortunes-de ;;
    c-code) echo uclibc-source ;;
    man-pages) echo manpages manpages-dev groff-base ;;
    python) echo libpython3.11-stdlib ;;
    broad) echo perl-doc debian-reference-en ;;
    go-code) echo golang-1.19-src ;;
    rust-code) echo rust-src ;;
    ruby-code) echo libruby3.1 ;;
    emacs-lisp) echo emacs-el ;;
    latex) echo texlive-latex-base ;;
    sql-docs) echo postgresql-doc-15 ;;
    *) echo "corpora.sh: unknown domain '$1' (known: ${all[*]} ${more[*]} broad)" >&2; exit 2 ;;
  esac
}

todo=() needed=()
for d in "${domains[@]}"; do
  pkgs=$(packages_of "$d")
  dir="$out_root/$d"
  [ -s "$dir/train.txt" ] && [ -s "$dir/heldout.txt" ] && [ -e "$dir/.v2" ] && continue
  todo+=("$d")
  needed+=($pkgs)
done
[ ${#todo[@]} -eq 0 ] && exit 0
bash "$root/scripts/setup.sh" "${needed[@]}"
mkdir -p "$out_root"
/usr/bin/python3 "$root/scripts/corpora.py" "$out_root" "${todo[@]}"
