#!/usr/bin/env bash
# Renders peerd's live page (GET / on the admin port) in headless Chromium, signed in the way a
# person is: a form POSTs the admin token to /login (from a page in a private temporary directory,
# removed afterwards: the token never goes into a URL), peerd answers with the session cookie and
# sends the browser to the page, whose script draws from the admin API.
#   usage: scripts/dashboard.sh screenshot ADMIN_ADDRESS TOKEN_FILE OUT.png   (1280 px wide)
#          scripts/dashboard.sh dom ADMIN_ADDRESS TOKEN_FILE                  (the DOM once drawn, on stdout)
# Needs Debian's chromium (scripts/setup.sh installs it).
set -euo pipefail
mode=${1:-}; admin=${2:-}; token_file=${3:-}; out=${4:-}
case "$mode" in screenshot) [ -n "$out" ] || mode=bad ;; dom) ;; *) mode=bad ;; esac
if [ "$mode" = bad ] || [ -z "$admin" ] || [ -z "$token_file" ]; then
  sed -n '2,8p' "$0" >&2; exit 2
fi
command -v chromium >/dev/null || { echo "dashboard.sh: needs chromium (apt-get install chromium, or scripts/setup.sh)" >&2; exit 1; }
[ -r "$token_file" ] || { echo "dashboard.sh: cannot read the admin token from $token_file" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 700 "$work"
token=$(head -n 1 "$token_file")
cat > "$work/sign-in.html" <<HTML
<!doctype html><html><body>
<form id="f" method="post" action="http://$admin/login"><input type="hidden" name="token" value="$token"></form>
<script>document.getElementById("f").submit()</script>
</body></html>
HTML
flags=(--headless --no-sandbox --disable-gpu --disable-dev-shm-usage --no-first-run --hide-scrollbars
       --user-data-dir="$work/profile" --virtual-time-budget=20000)
if [ "$mode" = screenshot ]; then
  HOME="$work" timeout 120 chromium "${flags[@]}" --window-size=1280,1500 --screenshot="$(realpath -m "$out")" \
    "file://$work/sign-in.html" > "$work/chromium.log" 2>&1 || { cat "$work/chromium.log" >&2; exit 1; }
  [ -s "$out" ] || { echo "dashboard.sh: chromium wrote no screenshot" >&2; cat "$work/chromium.log" >&2; exit 1; }
else
  HOME="$work" timeout 120 chromium "${flags[@]}" --dump-dom "file://$work/sign-in.html" 2> "$work/chromium.log" ||
    { cat "$work/chromium.log" >&2; exit 1; }
fi
