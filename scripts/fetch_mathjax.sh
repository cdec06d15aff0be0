#!/usr/bin/env bash
# Fetch MathJax 3 (the es5 bundle: tex-chtml.js, its components and CHTML fonts) from the
# npm registry into a folder served with the book, so the book renders formulas offline.
# Usage: scripts/fetch_mathjax.sh [VERSION] [DEST]   (defaults: 3.2.2 book/_static/mathjax)
set -euo pipefail

version="${1:-3.2.2}"
dest="${2:-book/_static/mathjax}"
dest="${dest%/}"

if [[ -f "$dest/tex-chtml.js" ]]; then
    echo "MathJax already in $dest"
    exit 0
fi
command -v npm >/dev/null || { echo "error: npm is needed to fetch MathJax" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "Fetching mathjax@$version from the npm registry"
(cd "$tmp" && npm pack --silent "mathjax@$version" >/dev/null)
tar -xzf "$tmp"/mathjax-"$version".tgz -C "$tmp"
test -f "$tmp/package/es5/tex-chtml.js" || { echo "error: es5/tex-chtml.js missing" >&2; exit 1; }
test -d "$tmp/package/es5/output/chtml/fonts/woff-v2" || {
    echo "error: es5/output/chtml/fonts missing" >&2
    exit 1
}

# Copy into a sibling temp folder, then rename: an interrupted fetch leaves no half copy.
mkdir -p "$(dirname "$dest")"
rm -rf "$dest.tmp"
cp -R "$tmp/package/es5" "$dest.tmp"
cp "$tmp/package/LICENSE" "$dest.tmp/LICENSE"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
echo "MathJax $version in $dest ($(du -sh "$dest" | cut -f1))"
