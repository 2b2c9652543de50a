#!/usr/bin/env bash
# WMT14 English-German for the paper's translation runs, as fairseq's
# examples/translation/prepare-wmt14en2de.sh (--icml17, the WMT14 corpora) prepares it, with
# sacremoses and subword-nmt from PyPI in place of the Moses and subword-nmt repositories.
set -euo pipefail

PROG=prepare-wmt14-en-de.sh
# shellcheck source=scripts/prepare-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/prepare-lib.sh"

# archive | where it is downloaded from | the files of it that the recipe reads
ARCHIVES=(
    "training-parallel-europarl-v7.tgz|http://statmt.org/wmt13/training-parallel-europarl-v7.tgz|training/europarl-v7.de-en.en training/europarl-v7.de-en.de"
    "training-parallel-commoncrawl.tgz|http://statmt.org/wmt13/training-parallel-commoncrawl.tgz|commoncrawl.de-en.en commoncrawl.de-en.de"
    "training-parallel-nc-v9.tgz|http://statmt.org/wmt14/training-parallel-nc-v9.tgz|training/news-commentary-v9.de-en.en training/news-commentary-v9.de-en.de"
    "dev.tgz|http://data.statmt.org/wmt17/translation-task/dev.tgz|dev/newstest2013.en dev/newstest2013.de"
    "test-full.tgz|http://statmt.org/wmt14/test-full.tgz|test-full/newstest2014-deen-src.en.sgm test-full/newstest2014-deen-ref.de.sgm"
)
TRAIN_CORPORA=(training/europarl-v7.de-en commoncrawl.de-en training/news-commentary-v9.de-en)
VALID_SET=dev/newstest2013
TEST_SGM_EN=test-full/newstest2014-deen-src.en.sgm
TEST_SGM_DE=test-full/newstest2014-deen-ref.de.sgm

usage() {
    cat <<EOF
Usage: scripts/prepare-wmt14-en-de.sh [options]

Downloads the WMT14 En-De training corpora (Europarl v7, CommonCrawl, News Commentary v9),
newstest2013 (valid) and newstest2014 (test-full, 3,003 sentences; test), then, as fairseq's
prepare-wmt14en2de.sh: Moses punctuation normalisation, removal of non-printing characters and
tokenisation with aggressive hyphen splitting (tokenizer.perl -a; sacremoses here), joint BPE
with subword-nmt learned on the English and German training text together, clean-corpus-n
(ratio 1.5, 1 to 250 tokens) on train and valid, and fairseq-preprocess --joined-dictionary.

  --bpe-tokens N        BPE merges (default 40000; a few hundred for a smoke run)
  --raw-dir DIR         the raw corpora (default data-raw/wmt14-en-de). What is there already is
                        used as it is: the archives training-parallel-europarl-v7.tgz,
                        training-parallel-commoncrawl.tgz, training-parallel-nc-v9.tgz, dev.tgz
                        and test-full.tgz, or the files extracted from them, laid out as in the
                        archives (DIR/training/europarl-v7.de-en.en, DIR/commoncrawl.de-en.de,
                        DIR/dev/newstest2013.en, DIR/$TEST_SGM_EN, ...).
                        Only what is missing is downloaded.
  --mirror URL          download every archive from URL/<archive name> instead of statmt.org
                        (default: \$WMT14_MIRROR)
  --out DIR             output directory (default data-bin/wmt14_en_de)
  --workers N           worker processes (default: the number of CPUs)
  --keep-text           keep the tokenized BPE text (train/valid/test .en/.de) in OUT/text
  --force               redo the output even if it is complete
  -h, --help            this help

The output appears only when complete, with a file COMPLETE in it; a run that finds it complete
does nothing. OUT/code holds the BPE merges. Environment: PYTHON (default python3).
EOF
}

BPE_TOKENS=40000
RAW_DIR=data-raw/wmt14-en-de
MIRROR=${WMT14_MIRROR:-}
OUT_DIR=data-bin/wmt14_en_de
WORKERS=$(cpu_count)
KEEP_TEXT=0
FORCE=0

while (($#)); do
    case $1 in
        --bpe-tokens) need_value "$@"; BPE_TOKENS=$2; shift 2 ;;
        --raw-dir) need_value "$@"; RAW_DIR=$2; shift 2 ;;
        --mirror) need_value "$@"; MIRROR=$2; shift 2 ;;
        --out) need_value "$@"; OUT_DIR=$2; shift 2 ;;
        --workers) need_value "$@"; WORKERS=$2; shift 2 ;;
        --keep-text) KEEP_TEXT=1; shift ;;
        --force) FORCE=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
done
[[ $BPE_TOKENS =~ ^[1-9][0-9]*$ ]] || die "--bpe-tokens must be a positive integer, not '$BPE_TOKENS'"
[[ $WORKERS =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive integer, not '$WORKERS'"
RAW_DIR=${RAW_DIR%/}

exit_if_complete "$OUT_DIR"

# -- what is needed, checked before anything is written ----------------------------------------
require_python_modules fairseq_cli=fairseq sacremoses=sacremoses \
    subword_nmt=subword-nmt regex=regex tqdm=tqdm

to_extract=() to_download=()
for entry in "${ARCHIVES[@]}"; do
    IFS='|' read -r archive url members <<<"$entry"
    for member in $members; do
        if [[ ! -f $RAW_DIR/$member ]]; then
            to_extract+=("$entry")
            [[ -f $RAW_DIR/$archive ]] || to_download+=("$entry")
            break
        fi
    done
done
needed_commands=()
((${#to_extract[@]} == 0)) || needed_commands+=(tar find)
((${#to_download[@]} == 0)) || needed_commands+=(curl)
((${#needed_commands[@]} == 0)) || require_commands "${needed_commands[@]}"

begin_output "$OUT_DIR"
WORK=$PARTIAL/work
# subword-nmt's parallel workers write temporary files of the corpus's size: keep them here.
export TMPDIR=$WORK/tmp
mkdir -p "$WORK" "$TMPDIR"
step begin "preparing WMT14 En-De with $BPE_TOKENS BPE merges into $OUT (working in $PARTIAL)"

# -- the raw corpora: each archive is downloaded whole (as .part first) and the files the recipe
# reads are moved out of a scratch extraction directory, so a file in RAW_DIR is always complete.
remove_stale "$RAW_DIR"/.extract.*
for entry in "${to_extract[@]}"; do
    IFS='|' read -r archive url members <<<"$entry"
    if [[ ! -f $RAW_DIR/$archive ]]; then
        [[ -z $MIRROR ]] || url=${MIRROR%/}/$archive
        download "$url" "$RAW_DIR/$archive" \
            "or pass --raw-dir with a directory that holds $archive or the files extracted from it, or --mirror URL"
    fi
    step extract "extracting $members from $RAW_DIR/$archive"
    scratch=$RAW_DIR/.extract.$$
    SCRATCH_PATHS+=("$scratch")
    rm -rf "$scratch"
    mkdir -p "$scratch"
    patterns=()
    for member in $members; do patterns+=("*$member"); done
    tar -xzf "$RAW_DIR/$archive" -C "$scratch" --wildcards "${patterns[@]}" ||
        die "could not extract ${patterns[*]} from $RAW_DIR/$archive" \
            "if the archive is damaged, remove it to download it again"
    for member in $members; do
        found=$(find "$scratch" -type f -path "*/$member" | head -n 1)
        [[ -n $found ]] || die "$RAW_DIR/$archive holds no $member"
        mkdir -p "$(dirname "$RAW_DIR/$member")"
        mv "$found" "$RAW_DIR/$member"
    done
    rm -rf "$scratch"
done

# -- normalise and tokenise ----------------------------------------------------------------------
text_jobs=()
for lang in en de; do
    train_files=()
    for corpus in "${TRAIN_CORPORA[@]}"; do train_files+=("$RAW_DIR/$corpus.$lang"); done
    text_jobs+=(--text "$lang" "$WORK/train.tok.$lang" "${train_files[@]}")
    text_jobs+=(--text "$lang" "$WORK/valid.tok.$lang" "$RAW_DIR/$VALID_SET.$lang")
done
step tokenize "normalising and tokenising train (${TRAIN_CORPORA[*]}), valid ($VALID_SET) and test (newstest2014); workers: $WORKERS"
"$PYTHON" "$PREPARE_PY/wmt.py" tokenize --workers "$WORKERS" "${text_jobs[@]}" \
    --sgm en "$WORK/test.tok.en" "$RAW_DIR/$TEST_SGM_EN" \
    --sgm de "$WORK/test.tok.de" "$RAW_DIR/$TEST_SGM_DE"

# the untokenized German side of newstest2014, the reference of detokenized sacreBLEU
# (fairseq-agg-eval mt --reference OUT/test.raw.de)
step reference "extracting the raw German side of newstest2014 (the reference of detokenized sacreBLEU)"
"$PYTHON" "$PREPARE_PY/wmt.py" reference "$RAW_DIR/$TEST_SGM_DE" "$PARTIAL/test.raw.de"

# -- joint BPE -----------------------------------------------------------------------------------
step learn-bpe "learning $BPE_TOKENS BPE merges on the English and German training text together"
cat "$WORK/train.tok.en" "$WORK/train.tok.de" >"$WORK/train.tok.en-de"
"$PYTHON" -m subword_nmt.learn_bpe --input "$WORK/train.tok.en-de" --output "$PARTIAL/code" \
    --symbols "$BPE_TOKENS" --num-workers "$WORKERS"
rm "$WORK/train.tok.en-de"
for split in train valid test; do
    for lang in en de; do
        step apply-bpe "applying BPE to $split.$lang"
        "$PYTHON" -m subword_nmt.apply_bpe --codes "$PARTIAL/code" --num-workers "$WORKERS" \
            --input "$WORK/$split.tok.$lang" --output "$WORK/bpe.$split.$lang"
    done
done

# -- clean and binarize --------------------------------------------------------------------------
step clean "cleaning train and valid (clean-corpus-n: ratio 1.5, 1 to 250 tokens)"
"$PYTHON" "$PREPARE_PY/wmt.py" clean --langs en de --ratio 1.5 --min 1 --max 250 \
    --corpus "$WORK/bpe.train" "$WORK/train" --corpus "$WORK/bpe.valid" "$WORK/valid"
for lang in en de; do mv "$WORK/bpe.test.$lang" "$WORK/test.$lang"; done

step binarize "fairseq-preprocess --joined-dictionary"
"$PYTHON" -m fairseq_cli.preprocess --source-lang en --target-lang de \
    --trainpref "$WORK/train" --validpref "$WORK/valid" --testpref "$WORK/test" \
    --destdir "$PARTIAL" --joined-dictionary --workers "$WORKERS"

pairs() { wc -l <"$WORK/$1.en" | tr -d ' '; }
summary=(
    "bpe: $BPE_TOKENS merges learned (code)"
    "pairs: train $(pairs train), valid $(pairs valid), test $(pairs test)"
    "dictionary: $(($(wc -l <"$PARTIAL/dict.en.txt") + 4)) symbols, joined (dict.en.txt = dict.de.txt)"
)
if ((KEEP_TEXT)); then
    mkdir -p "$PARTIAL/text"
    mv "$WORK"/{train,valid,test}.{en,de} "$PARTIAL/text/"
fi
rm -rf "$WORK"
finish_output "raw corpora: $RAW_DIR" "${summary[@]}"
log "${summary[1]}; ${summary[2]}"
