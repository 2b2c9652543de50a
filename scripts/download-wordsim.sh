#!/usr/bin/env bash
# Downloads the four word-similarity datasets of the paper's Table 6 (MEN, WS353, RG65, RW) into
# data/wordsim/, where `fairseq-agg-eval lm` looks for them before falling back to the excerpts
# shipped in data/wordsim/excerpts. The files are those of mfaruqui/eval-word-vectors
# (word1<TAB>word2<TAB>score; cite each dataset's own paper, see data/wordsim/excerpts/).
#
#   bash scripts/download-wordsim.sh [DEST]          (default DEST: data/wordsim)
#   WORDSIM_BASE_URL=https://... bash scripts/download-wordsim.sh   # another mirror
#
# Each file is checked for its canonical number of pairs and only then moved into place, so a
# failed or truncated download never leaves a file that the evaluation would read.
set -euo pipefail
PROG=download-wordsim
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${1:-$REPO_ROOT/data/wordsim}
BASE_URL=${WORDSIM_BASE_URL:-https://raw.githubusercontent.com/mfaruqui/eval-word-vectors/master/data/word-sim}
# file, canonical pair count
FILES=("EN-MEN-TR-3k.txt 3000" "EN-WS-353-ALL.txt 353" "EN-RG-65.txt 65" "EN-RW-STANFORD.txt 2034")

die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
command -v curl >/dev/null 2>&1 || die "curl is missing: install it (e.g. apt-get install curl)"
mkdir -p "$DEST"
TMP=$(mktemp -d "$DEST/.download.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

for entry in "${FILES[@]}"; do
    read -r name pairs <<<"$entry"
    if [[ -f $DEST/$name ]]; then
        echo "[$PROG] $DEST/$name already there" >&2
        continue
    fi
    echo "[$PROG] downloading $BASE_URL/$name" >&2
    curl -fsSL --retry 3 --connect-timeout 30 -o "$TMP/$name" "$BASE_URL/$name" ||
        die "download failed: $BASE_URL/$name (check the network, or set WORDSIM_BASE_URL to a mirror holding $name)"
    # count the non-empty lines (WS353 has CRLF line ends)
    got=$(tr -d '\r' <"$TMP/$name" | grep -c .) || got=0
    [[ $got == "$pairs" ]] ||
        die "$BASE_URL/$name has $got pairs, the canonical file has $pairs: not moved into $DEST"
    mv "$TMP/$name" "$DEST/$name"
    echo "[$PROG] $DEST/$name: $pairs pairs" >&2
done
echo "[$PROG] done: fairseq-agg-eval lm now uses the full datasets in $DEST" >&2
